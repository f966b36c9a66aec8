"""config: layers, types, unknown keys."""
import pytest

from oncolake import config
from oncolake.errors import ConfigError


def write(folder, name, text):
    (folder / f"{name}.yaml").write_text(text)


def test_layers_apply_in_order(tmp_path):
    write(tmp_path, "base", "lake: base\ningest:\n  max_pixels: 10\n  min_side: 2\n")
    write(tmp_path, "dev", "lake: dev\ningest:\n  max_pixels: 20\n")
    cfg = config.load("dev", overrides=["ingest.max_pixels=30"], conf_dir=tmp_path,
                      environ={"ONCOLAKE_LAKE": "hdfs://nn:9000/x"})
    assert cfg.lake == "hdfs://nn:9000/x"
    assert (cfg.ingest.max_pixels, cfg.ingest.min_side) == (30, 2)


def test_environment_sets_only_listed_keys(tmp_path):
    write(tmp_path, "base", "")
    write(tmp_path, "x", "")
    cfg = config.load("x", conf_dir=tmp_path, environ={"ONCOLAKE_INGEST_MAX_PIXELS": "1",
                                                      "ONCOLAKE_SPARK_MASTER": "spark://h:7077"})
    assert cfg.ingest.max_pixels == config.IngestConfig().max_pixels
    assert cfg.spark.master == "spark://h:7077"


def test_unknown_key_is_an_error(tmp_path):
    write(tmp_path, "base", "ingest:\n  max_pixel: 10\n")
    write(tmp_path, "x", "")
    with pytest.raises(ConfigError, match="ingest.max_pixel"):
        config.load("x", conf_dir=tmp_path)


def test_wrong_type_and_missing_env_are_errors(tmp_path):
    write(tmp_path, "base", "")
    write(tmp_path, "x", "")
    with pytest.raises(ConfigError, match="must be a number"):
        config.load("x", overrides=["ingest.max_pixels=lots"], conf_dir=tmp_path)
    with pytest.raises(ConfigError, match="no configuration for env"):
        config.load("nowhere", conf_dir=tmp_path)
    with pytest.raises(ConfigError, match="key=value"):
        config.load("x", overrides=["lake"], conf_dir=tmp_path)


def test_spark_conf_keys_keep_their_dots(tmp_path):
    write(tmp_path, "base", "")
    write(tmp_path, "x", "")
    cfg = config.load("x", overrides=["spark.conf.spark.executor.memory=1g"], conf_dir=tmp_path)
    assert cfg.spark.conf["spark.executor.memory"] == "1g"


def test_repository_configuration_loads_for_every_env():
    for env in ("local", "cluster"):
        cfg = config.load(env)
        assert cfg.preprocess.size == 128
    assert config.load("cluster").lake.startswith("hdfs://")
    # the settings measured best per data set (docs/results.md)
    assert config.load("local", dataset="busi").preprocess.size == 64
    for name in ("ham", "ham10000"):
        ham = config.load("local", dataset=name)
        assert (ham.preprocess.size, ham.train.epochs, ham.train.patience) == (96, 45, 12)
        assert ham.preprocess.shades_of_grey == 6
    busi = config.load("local", dataset="busi")
    assert busi.preprocess.shades_of_grey == 0
    assert (busi.preprocess.aux_attribute, busi.train.aux_weight) == ("diagnosis", 0.5)
    assert (config.load("local").preprocess.aux_attribute, config.load("local").train.aux_weight) == ("", 0.0)


def test_describe_hides_secrets():
    described = config.describe(config.load("local", overrides=["mlflow.tracking_uri=http://u:pw@h:5000"]))
    assert described["ingest"]["extensions"][0] == ".jpg"
    assert described["mlflow"]["tracking_uri"] == "http://***@h:5000"


def test_stream_trigger_intervals_take_short_and_long_forms():
    from oncolake.stream.ingest import interval
    assert [interval(t) for t in ("30s", "500ms", "2m", "1h", "30 seconds", "1 minute")] == [
        "30 seconds", "500 milliseconds", "2 minutes", "1 hours", "30 seconds", "1 minutes"]
    for bad in ("soon", "", "30", "-5s", "5 parsecs"):
        with pytest.raises(ConfigError, match="--trigger"):
            interval(bad)


def test_names_reach_sql_only_quoted(spark):
    from oncolake import lake
    hostile = ["it's", "a\\'; DROP TABLE t; --", "back\\slash", "plain"]
    literals = spark.sql("SELECT " + ", ".join(f"{lake.sql_string(v)} AS c{i}" for i, v in enumerate(hostile))).first()
    assert list(literals) == hostile  # each came back as the very string, nothing executed
    assert lake.sql_path("file:/tmp/a`b") == "delta.`file:/tmp/a``b`"


def test_a_datasets_entry_sits_between_the_files_and_the_environment_and_set(tmp_path):
    write(tmp_path, "base", "preprocess:\n  size: 128\ntrain:\n  epochs: 30\n"
                            "datasets:\n  busi: {preprocess: {size: 64}, train: {epochs: 12}}\n")
    write(tmp_path, "x", "train:\n  epochs: 20\n"
                         "datasets:\n  busi: {ingest: {dicom: {key_file: /from/entry}}}\n")
    busi = config.load("x", conf_dir=tmp_path, dataset="busi")
    assert (busi.preprocess.size, busi.train.epochs, busi.ingest.dicom.key_file) == (64, 12, "/from/entry")
    other = config.load("x", conf_dir=tmp_path, dataset="ham")
    assert (other.preprocess.size, other.train.epochs, other.ingest.dicom.key_file) == (128, 20, "")
    assert config.load("x", conf_dir=tmp_path).preprocess.size == 128
    over = config.load("x", conf_dir=tmp_path, dataset="busi", overrides=["preprocess.size=96"],
                       environ={"ONCOLAKE_DICOM_KEY_FILE": "/from/env"})
    assert (over.preprocess.size, over.train.epochs, over.ingest.dicom.key_file) == (96, 12, "/from/env")
    # the nightly run has no --dataset: its nightly.dataset names the entry, however it is set
    night = config.load("x", conf_dir=tmp_path, overrides=["nightly.dataset=busi"])
    assert (night.preprocess.size, night.nightly.dataset) == (64, "busi")


def test_every_datasets_entry_is_checked_whether_used_or_not(tmp_path):
    write(tmp_path, "x", "")
    for entry, message in (("ham: {preprocess: {sise: 96}}", "datasets.ham: unknown configuration key.*sise"),
                           ("ham: {train: {epochs: many}}", "datasets.ham: .*must be"),
                           ("ham: {lake: /elsewhere}", "datasets.ham may set only"),
                           ("ham: {spark: {master: 'local[1]'}}", "datasets.ham may set only"),
                           ("ham: 96", "datasets.ham must be a mapping"),
                           ("[ham]", "datasets must map")):
        write(tmp_path, "base", f"datasets:\n  {entry}\n" if not entry.startswith("[") else f"datasets: {entry}\n")
        with pytest.raises(ConfigError, match=message):
            config.load("x", conf_dir=tmp_path, dataset="busi")
    write(tmp_path, "base", "ingest:\n  max_pixel: 1\ndatasets:\n  ham: {train: {epochs: 3}}\n")
    with pytest.raises(ConfigError, match="^unknown configuration key.*ingest.max_pixel"):
        config.load("x", conf_dir=tmp_path)
    write(tmp_path, "base", "")
    with pytest.raises(ConfigError, match="set the key itself"):
        config.load("x", conf_dir=tmp_path, overrides=["datasets.ham.train.epochs=3"])
