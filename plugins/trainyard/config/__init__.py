"""YAML -> ResolvedPipeline: the environment and pipeline files, validated. No Airflow imports."""
