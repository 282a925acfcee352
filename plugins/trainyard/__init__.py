"""Trainyard: YAML-defined training pipelines for Apache Airflow (the Airflow-side package)."""
