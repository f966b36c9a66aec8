"""Images through Apache Kafka: the record format, the producer, the streaming ingest.

:mod:`records` is the wire format both sides share; :mod:`produce` publishes
a folder (no Spark); :mod:`ingest` is Spark Structured Streaming into the
same validation and Delta merge as folder ingest.
"""
