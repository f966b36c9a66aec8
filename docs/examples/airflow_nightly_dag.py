"""Example Airflow DAG: the oncolake night (ingest what landed, score, log).

Copy into your Airflow dags folder and set ONCOLAKE_HOME to the checkout on
the worker. Not imported by oncolake or its tests (Airflow is not a
dependency); scripts/nightly.sh does the work and exits non-zero on failure,
which fails the task.
"""
import datetime as dt
import os

from airflow import DAG
from airflow.operators.bash import BashOperator

HOME = os.environ.get("ONCOLAKE_HOME", "/opt/oncolake")

with DAG(
    dag_id="oncolake_nightly",
    schedule="30 2 * * *",
    start_date=dt.datetime(2026, 1, 1),
    catchup=False,  # scoring itself catches up every partition not yet scored
    max_active_runs=1,
    default_args={"retries": 2, "retry_delay": dt.timedelta(minutes=10)},
) as dag:
    BashOperator(
        task_id="nightly",
        bash_command=(f"cd {HOME} && scripts/nightly.sh --env cluster "
                      "--set nightly.dataset=isic --set nightly.incoming=hdfs://namenode:9000/incoming/isic"),
    )
