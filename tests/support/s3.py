"""S3 for tests: moto's server on 127.0.0.1, speaking the real protocol to boto3, s3fs and datasets."""

from __future__ import annotations

from pathlib import Path

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


class MotoS3:
    """``with MotoS3("bucket") as s3:`` gives ``s3.endpoint`` and a boto3 ``s3.client``."""

    def __init__(self, *buckets: str) -> None:
        self.buckets = buckets or ("trainyard",)

    def __enter__(self) -> MotoS3:
        import boto3
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        self.client = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
        )
        for bucket in self.buckets:
            self.client.create_bucket(Bucket=bucket)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop()

    def upload_tree(self, local: Path, uri_prefix: str) -> str:
        """Upload every file under ``local`` to ``s3://bucket/prefix``; returns that URI."""
        bucket, _, prefix = uri_prefix.removeprefix("s3://").partition("/")
        for path in local.rglob("*"):
            if path.is_file():
                self.client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(local).as_posix()}")
        return uri_prefix
