"""The handler's metrics on any metrics configuration, and the archive's package check, in-process."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
from conftest import ROOT
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
from ts.metrics.metric_type_enum import MetricTypes

from handler.deps import MissingPackages, check_requirements, read_requirements
from handler.metrics import METRICS, HandlerMetrics

TS_DEFAULT_METRICS = Path(sys.modules["ts"].__file__).parent / "configs" / "metrics.yaml"


def _cache(path: Path) -> MetricsCacheYamlImpl:
    cache = MetricsCacheYamlImpl(config_file_path=str(path))
    cache.initialize_cache()
    cache.model_name = "m"
    return cache


@pytest.mark.parametrize("config", [TS_DEFAULT_METRICS, ROOT / "metrics.yaml"], ids=["torchserve", "project"])
def test_every_metric_is_made_on_either_metrics_configuration(config, caplog):
    cache = _cache(config)
    with caplog.at_level(logging.INFO, logger="handler.metrics"):
        metrics = HandlerMetrics(cache, "m")
    assert set(metrics.metrics) == {spec.name for spec in METRICS}
    added = "added at load" in caplog.text
    assert added == (config == TS_DEFAULT_METRICS)  # TorchServe's own file declares none of them
    metrics.batch(3, 1.0, 2.0, 3.0, maps=4)
    metrics.rejected("invalid_option")
    batches = cache.get_metric("GradcamBatches", MetricTypes.COUNTER)
    assert batches.dimension_names == ["ModelName", "Level", "BatchSize"]
    size = cache.get_metric("GradcamBatchSize", MetricTypes.GAUGE)
    assert size.metric_type == MetricTypes.GAUGE and size.unit in ("Count", "count")


def test_a_metric_that_cannot_be_made_is_dropped_with_one_warning(caplog):
    class Broken:
        def get_metric(self, name, kind):
            from ts.metrics.metric_cache_errors import MetricsCacheKeyError

            raise MetricsCacheKeyError(name)

        def add_metric_to_cache(self, name, unit, dims, kind):
            if name == "GradcamMaps":
                raise TypeError("no such unit")
            return _cache(TS_DEFAULT_METRICS).add_metric_to_cache(name, unit, dims, kind)

    with caplog.at_level(logging.WARNING, logger="handler.metrics"):
        metrics = HandlerMetrics(Broken(), "m")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "GradcamMaps" in warnings[0].getMessage()
    assert "GradcamMaps" not in metrics.metrics and len(metrics.metrics) == len(METRICS) - 1
    metrics.batch(2, 1.0, 1.0, 1.0, maps=2)  # serves on without it


def test_requirements_lines_are_read_as_pins(tmp_path):
    path = tmp_path / "requirements.txt"
    path.write_text("--no-index\n--find-links /w\n# comment\nnumpy==2.4.6\ntimm == 1.0.31  # pinned\n"
                    "extra[cli]==3\nloose\nlocal @ file:///w/local-1.0-py3-none-any.whl\nhttps://x/y.whl\n")
    assert read_requirements(path) == [("numpy", "2.4.6"), ("timm", "1.0.31"), ("extra", "3"), ("loose", None),
                                       ("local", None)]


def test_a_missing_package_is_named_with_the_setting_that_installs_it(tmp_path, caplog):
    from importlib import metadata

    (tmp_path / "requirements.txt").write_text(
        f"numpy=={metadata.version('numpy')}\npillow==0.0.1\nnot-a-real-package-xyz==1.2\n")
    wanted = r"needs not-a-real-package-xyz==1\.2, .*install_py_dep_per_model=true"
    with caplog.at_level(logging.WARNING, logger="handler.deps"), pytest.raises(MissingPackages, match=wanted):
        check_requirements(tmp_path)
    assert "pillow" in caplog.text and "archive built with 0.0.1" in caplog.text  # another version: a warning
    (tmp_path / "requirements.txt").write_text("numpy\n")
    check_requirements(tmp_path)  # satisfied
    (tmp_path / "requirements.txt").unlink()
    check_requirements(tmp_path)  # archives from before requirements.txt still load


def test_the_archiver_refuses_an_unreadable_requirements_file(tmp_path):
    from handler.tools import archive

    text = archive.requirements_txt("timm:resnet10t")
    assert [line.split("==")[0] for line in text.splitlines()] == [
        "numpy", "pillow", "safetensors", "pyyaml", "timm", "torchvision"]
    assert "torchvision" not in archive.requirements_txt("model_src/model.py:Net")
    with pytest.raises(archive.ArchiveError, match="cannot read --requirements file"):
        archive.requirements_txt("timm:resnet10t", tmp_path / "missing.txt")
