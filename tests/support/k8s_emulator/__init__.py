"""A strict, in-process emulator of the Kubernetes API server (and a kubelet) for tests.

No cluster, Docker engine or internet exists on the development and CI machines, so the tests point
the *real* ``KubernetesPodOperator`` (sync and deferrable modes, i.e. the ``kubernetes`` and
``kubernetes_asyncio`` clients) at this emulator over plain HTTP through a kubeconfig::

    with KubernetesEmulator() as k8s:
        k8s.add_namespace("ml")
        k8s.add_priority_class("trainyard-dev", 1000)
        kubeconfig = k8s.write_kubeconfig(tmp_path / "kubeconfig")
        ...  # KubernetesPodOperator(config_file=str(kubeconfig), in_cluster=False, namespace="ml", ...)

What is real and what is emulated (modules in brackets):

* **API server** [http, api, selectors]. JSON over HTTP/1.1 with bearer-token auth, real ``Status``
  error objects, resource versions, label selectors (``=``, ``==``, ``!=``, ``key``, ``!key``, ``in``,
  ``notin``), field selectors (a per-kind whitelist; others are 400 like the real server), watches
  (``?watch=true``, newline-delimited events), merge / strategic-merge patches of ``metadata.labels``
  and ``annotations`` (other fields: 422 like the real "pod updates may not change fields" rule) and
  graceful deletion, finalizers (a deleted pod stays, marked, until its finalizers are gone).
  Served: ``/version``; pods (list, watch, create, get, patch, delete, log) and events (list, watch)
  in a namespace; Kueue's objects and visibility API (below). Any other path is a 404 listed in
  ``unknown_routes``. A pod with ``spec.schedulingGates`` gets ``PodScheduled=False``
  ``SchedulingGated`` at creation, as the pod strategy sets it, and the kubelet leaves it alone.
* **Admission** [admission], in the real order: schema validation against the bundled Kubernetes
  OpenAPI schema (``kubernetes_validate``, strict: unknown fields are errors) plus the semantic rules a
  schema cannot express (names, duplicate containers, quantities, extended resources, requests <=
  limits) -> 422 ``Invalid`` listing every field error; namespace must exist -> 404; PriorityClass must
  exist -> 403; ResourceQuota ``must specify`` and ``exceeded quota`` -> 403 with the real messages; an
  existing name -> 409 ``AlreadyExists``. A valid pod using something the kubelet here does not run
  (init or ephemeral containers, a second container, volumes other than ``emptyDir`` and
  ``persistentVolumeClaim``, ``workingDir``, env from anything but Secrets, ``generateName``) is
  refused with a 400 naming it, so no test passes on a pod that was only half run.
* **Kubelet** [kubelet]. The container's ``command + args`` runs as a local process (an argv list,
  never a shell) in its own process group, with a minimal environment (``PATH`` with this venv's
  ``bin`` first, so ``python`` is the venv's python; ``HOME``; ``LANG``) plus the pod's ``env`` and
  ``envFrom``. Secret references are resolved from :meth:`KubernetesEmulator.add_secret` values *in
  the process environment only* (a missing Secret or key leaves the container waiting in
  ``CreateContainerConfigError`` until it appears, as a real kubelet does). ``$(VAR)`` references
  are expanded like Kubernetes does. A pod it cannot start (no command, a command not on ``PATH``, a
  PVC never added) fails with reason ``EmulatorError``.
* **Mounts (the emulator's stand-in).** ``emptyDir`` volumes get a directory per pod,
  ``persistentVolumeClaim`` one per (namespace, claim) that outlives pods (so a relaunched pod sees
  the previous pod's checkpoints; see :meth:`KubernetesEmulator.add_persistent_volume_claim`).
  Because a process cannot see ``/cache/huggingface``, any env value or command/args element that
  equals a volumeMount's ``mountPath`` or lies under it is rewritten to the local directory (``/tmp``
  and ``/dev/shm`` exist locally and are left alone). The working directory is a per-pod temp dir.
* **Images** are not pulled: an image whose name contains ``does-not-exist`` waits in ``ErrImagePull``
  and then ``ImagePullBackOff`` forever; any other image "is present".
* **Logs** are stdout+stderr merged, one timestamp per line taken when the line is read (a process
  that block-buffers its stdout, as Python does without a TTY, shows its lines late, as in a real
  container); ``sinceSeconds``, ``tailLines``, ``timestamps`` and ``follow`` are served, other log
  options are a 400.
* **Disruptions** for tests, as the cluster component that causes each does them:
  :meth:`~KubernetesEmulator.preempt` (kube-scheduler: ``DisruptionTarget``, then a graceful
  DELETE), :meth:`~KubernetesEmulator.drain` (the Eviction API), :meth:`~KubernetesEmulator.kueue_stop`
  (``TerminationTarget``, then DELETE), :meth:`~KubernetesEmulator.evict` (node pressure: the pod
  stays, Failed with reason ``Evicted``), :meth:`~KubernetesEmulator.vanish` (force delete),
  :meth:`~KubernetesEmulator.oom_kill`; ``activeDeadlineSeconds`` is enforced (``DeadlineExceeded``).
  A deleted pod stays readable while its process stops (phase Running with a
  ``deletionTimestamp``) and for a moment in its final phase (:meth:`set_deleted_pod_linger`), then
  404s; its log stays available to tests. :meth:`~KubernetesEmulator.hold_scheduling` keeps new pods
  Pending (``Unschedulable``, as with no free GPU); :meth:`~KubernetesEmulator.lose_create_responses`
  answers an admitted create with 504; :meth:`~KubernetesEmulator.container_runs` lists every
  process with its start and end, so a test can prove two never overlapped.

* **Kueue v0.19.2** [kueue, kueue_pods, kueue_scheduler, kueue_quota, kueue_api, kueue_model,
  kueue_schema], installed by the first :meth:`~KubernetesEmulator.apply_kueue` (before that,
  Kueue labels mean nothing, as on a cluster without Kueue). Why: the training operator waits in
  LocalQueues, reads its Workload and its queue position, and is preempted by Kueue; those paths
  must meet upstream's objects and wording, not a guess. Ported from upstream's source, messages
  included:

  - ResourceFlavor, ClusterQueue, LocalQueue, WorkloadPriorityClass and Cohort, validated strictly
    against the upstream v1beta2 CRDs in ``../shared`` and defaulted from them (an unknown field
    is a 400; where ``../shared`` is absent the checks are skipped, everything else stays);
  - the pod webhook: managed label, finalizer, the ``admission`` and ``topology`` gates, role hash;
  - the pod integration: a Workload per pod (named like ``GetWorkloadNameForPod``, ``job-uid``
    label, controller ownerReference, priority from ``kueue.x-k8s.io/priority-class`` or the pod's
    PriorityClass); ``Run`` merges the flavor's nodeLabels/tolerations and the queue labels and
    ungates; ``Stop`` sets ``TerminationTarget`` and deletes with the pod's grace period;
    ``Finished`` is ``Succeeded``, ``Failed`` or ``OwnerNotFound``; a Workload whose pod is gone
    is garbage-collected;
  - classic scheduling: BestEffortFIFO/StrictFIFO, ``namespaceSelector`` (unset selects nothing),
    flavor assignment with fungibility, cohorts with borrowing and lending limits, and the default
    BlockUndeclared quota check (a request no resource group covers is never admitted, unless
    :meth:`~KubernetesEmulator.configure_kueue` sets the manager Configuration's ``resources``);
  - classic preemption (``withinClusterQueue``, ``reclaimWithinCohort``, ``borrowWithinCohort``)
    with upstream's conditions and events, and the legacy pending reasons (``Pending``,
    ``Inadmissible``: UnadmittedWorkloadsObservability is off by default);
  - the visibility API's ``pendingworkloads``.

  Emulated: the controllers run in one thread woken by every change, a few milliseconds after the
  write, as informers would; kube-scheduler binds a pod that Kueue admitted by preemption only once
  the pods preempted for it are gone (they hold the node's GPUs until then). Left out: fair
  sharing, admission checks, TAS placement, partial admission, pod groups (refused with a 400),
  MultiKueue, writes to Kueue objects over HTTP (tests apply them).

Not emulated: ``exec``/``attach``/``portforward`` (so no ``do_xcom_push`` sidecar), the Eviction API
endpoint (``drain`` does what it does), ``dryRun``, container restarts (every ``restartPolicy``
behaves like ``Never``), scheduling against node capacity (``hold_scheduling`` stands in),
ConfigMaps, Services, and reading namespaces, PriorityClasses or
ResourceQuotas through the API (tests create them with ``add_*``; admission enforces them).

Tests observe the cluster only through :class:`KubernetesEmulator`'s public methods
(``pods``, ``logs``, ``events``, ``requests_log``, ``received_pods``, ``admitted_pods``,
``process_environ``, ``wait_for_pod``, ``workloads``, ``admission_log``, ...), never through its store.
"""

from .emulator import KubernetesEmulator
from .status import ApiError

__all__ = ["ApiError", "KubernetesEmulator"]
