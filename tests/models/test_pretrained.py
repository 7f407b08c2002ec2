"""load_pretrained: a round trip into the body (head left alone), FEAT / MetaOptNet key names, and
each refusal (shape, missing, unexpected, not a state dict, a file that would run code)."""

from __future__ import annotations

import pickle

import pytest
import torch
from backbone_checks import image_batch

from innerloop.algorithms import ANIL, BaselinePP, ProtoNet
from innerloop.models import WRN28_10, ResNet12, load_pretrained

TINY = (4, 4, 4, 4)


def _save(path, state):
    torch.save(state, path)
    return path


def test_round_trip_loads_the_body_and_leaves_the_head(tmp_path):
    torch.manual_seed(0)
    source = ResNet12(1, 10, TINY, 16)
    torch.manual_seed(1)
    target = ResNet12(1, 5, TINY, 16)
    head = {k: v.clone() for k, v in target.head.state_dict().items()}
    report = load_pretrained(target, _save(tmp_path / "w.pt", source.state_dict()))
    for k, v in source.features.state_dict().items():
        assert torch.equal(target.features.state_dict()[k], v), k
    assert all(torch.equal(target.head.state_dict()[k], v) for k, v in head.items())
    assert report.skipped == ("head.bias", "head.weight") and not report.missing and not report.unexpected
    assert set(report.loaded) == {f"features.{k}" for k in source.features.state_dict()}


def test_the_head_loads_when_asked_and_its_shape_is_checked(tmp_path):
    path = _save(tmp_path / "w.pt", ResNet12(1, 10, TINY, 16).state_dict())
    same = ResNet12(1, 10, TINY, 16)
    assert "head.weight" in load_pretrained(same, path, head=True).loaded
    with pytest.raises(ValueError, match=r"pretrained head.weight: the file's shape \(10, 4\) differs from the "
                                         r"model's \(5, 4\)"):
        load_pretrained(ResNet12(1, 5, TINY, 16), path, head=True)


def test_a_body_of_other_widths_is_refused_naming_the_key_and_shapes(tmp_path):
    path = _save(tmp_path / "w.pt", ResNet12(1, 0, (8, 4, 4, 4), 16).state_dict())
    target = ResNet12(1, 0, TINY, 16)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match=r"features\.layer1\.0\.conv1\.weight: the file's shape \(8, 1, 3, 3\) "
                                         r"differs from the model's \(4, 1, 3, 3\)"):
        load_pretrained(target, path)
    assert all(torch.equal(target.state_dict()[k], v) for k, v in before.items())  # nothing copied


def test_feat_and_metaoptnet_names_load_with_key_and_rename(tmp_path):
    """FEAT saves ``{"params": {"encoder.layer1.0.conv1.weight": ...}}`` (MetaOptNet's names under
    ``encoder.``), with running statistics that a batch-statistics model does not keep."""
    torch.manual_seed(0)
    trained = ResNet12(3, 0, TINY, 16, track_running_stats=True)
    feat = {"params": {f"encoder.{k[len('features.'):]}": v for k, v in trained.state_dict().items()}}
    path = _save(tmp_path / "feat.pth", feat)
    model = ResNet12(3, 5, TINY, 16)
    report = load_pretrained(model, path, key="params", rename={"encoder.": "features."})
    assert torch.equal(model.features.layer4[0].conv3.weight, trained.features.layer4[0].conv3.weight)
    assert report.ignored and all(k.endswith(("running_mean", "running_var", "num_batches_tracked"))
                                  for k in report.ignored)
    tracking = ResNet12(3, 5, TINY, 16, track_running_stats=True)
    load_pretrained(tracking, path, key="params", rename={"encoder.": "features."})
    assert torch.equal(tracking.features.layer1[0].bn1.running_var, trained.features.layer1[0].bn1.running_var)


def test_dataparallel_prefix_is_stripped(tmp_path):
    source = WRN28_10(1, 0, depth=10, widen=1)
    path = _save(tmp_path / "w.pt", {f"module.{k}": v for k, v in source.state_dict().items()})
    target = WRN28_10(1, 3, depth=10, widen=1)
    report = load_pretrained(target, path, prefix="module.")
    assert len(report.loaded) == len(source.state_dict())


def test_missing_and_unexpected_keys_are_named(tmp_path):
    state = ResNet12(1, 0, TINY, 16).state_dict()
    state.pop("features.layer2.0.conv2.weight")
    state["features.extra.weight"] = torch.zeros(1)
    path = _save(tmp_path / "w.pt", state)
    with pytest.raises(ValueError, match=r"the model's \['features\.layer2\.0\.conv2\.weight'\] \(1\) are not "
                                         r"in the file; the file's \['features\.extra\.weight'\] \(1\) are not "
                                         r"in the model.*strict=False"):
        load_pretrained(ResNet12(1, 0, TINY, 16), path)
    report = load_pretrained(ResNet12(1, 0, TINY, 16), path, strict=False)
    assert report.missing == ("features.layer2.0.conv2.weight",)
    assert report.unexpected == ("features.extra.weight",)


def test_keys_that_match_nothing_point_to_rename(tmp_path):
    path = _save(tmp_path / "w.pt", {f"encoder.{k}": v for k, v in ResNet12(1, 0, TINY, 16).state_dict().items()})
    with pytest.raises(ValueError, match=r"no key of .* matches the model.*'encoder\.features.*prefix= / rename="):
        load_pretrained(ResNet12(1, 0, TINY, 16), path, strict=False)


def test_files_that_are_not_state_dicts_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_pretrained(ResNet12(1, 0, TINY, 16), tmp_path / "absent.pt")
    nested = _save(tmp_path / "ckpt.pt", {"epoch": 3, "state_dict": ResNet12(1, 0, TINY, 16).state_dict()})
    with pytest.raises(ValueError, match=r"entries \['epoch', 'state_dict'\] are not tensors.*key='epoch'|"
                                         r"not tensors; the state dict may sit under one of them"):
        load_pretrained(ResNet12(1, 0, TINY, 16), nested)
    assert load_pretrained(ResNet12(1, 0, TINY, 16), nested, key="state_dict").loaded
    with pytest.raises(ValueError, match=r"has no entry 'model' \(its top-level keys: \['epoch', 'state_dict'\]"):
        load_pretrained(ResNet12(1, 0, TINY, 16), nested, key="model")
    with pytest.raises(ValueError, match="holds list, not a state dict"):
        load_pretrained(ResNet12(1, 0, TINY, 16), _save(tmp_path / "list.pt", [torch.zeros(1)]))


class _Hostile:
    def __reduce__(self):
        return (print, ("code ran",))


def test_a_file_that_would_run_code_is_refused(tmp_path, capsys):
    path = tmp_path / "hostile.pt"
    with open(path, "wb") as f:
        pickle.dump({"features.layer1.0.conv1.weight": _Hostile()}, f, protocol=2)
    with pytest.raises(ValueError, match=r"weights_only=True"):
        load_pretrained(ResNet12(1, 0, TINY, 16), path)
    assert "code ran" not in capsys.readouterr().out


@pytest.mark.parametrize("cls", [ANIL, ProtoNet, BaselinePP])
def test_a_pretrained_body_serves_anil_protonets_and_baselinepp(tmp_path, cls):
    torch.manual_seed(0)
    path = _save(tmp_path / "w.pt", ResNet12(1, 0, TINY, 16).features.state_dict())
    ways = {ANIL: 3, ProtoNet: 0, BaselinePP: 6}[cls]
    model = ResNet12(1, ways, TINY, 16)
    load_pretrained(model, path, rename={"": "features."})
    algorithm = cls(model, "classification")
    grads, _ = algorithm.meta_gradient(image_batch())
    assert all(bool(torch.isfinite(g).all()) for g in grads.values())


# -- through a config ----------------------------------------------------------------------------------------
def _cfg(folder, **model):
    from innerloop.training.config import config_from_dict

    return config_from_dict({"task": {"family": "image-folder", "data_root": str(folder), "ways": 3, "shots": 1,
                                      "queries": 1, "image_size": 16},
                             "model": {"name": "resnet12", "widths": [4, 4, 4, 4], **model},
                             "algorithm": {"name": "anil"}, "eval": {"baseline": False}})


def test_a_config_builds_resnet12_and_wrn_with_a_pretrained_body(tmp_path, fewshot_folder):
    from innerloop.training.run import build_algorithm, build_family, identity

    body = ResNet12(3, 0, TINY, 16)
    state = {f"encoder.{k[9:]}": v for k, v in body.state_dict().items()}
    path = _save(tmp_path / "body.pt", {"state_dict": state})
    cfg = _cfg(fewshot_folder, pretrained=str(path), pretrained_key="state_dict",
               pretrained_rename={"encoder.": "features."}, drop_rate=0.1)
    family = build_family(cfg)
    algorithm = build_algorithm(cfg, family)
    model = algorithm.model
    assert isinstance(model, ResNet12) and model.head is not None and model.head.out_features == 3
    assert torch.equal(model.features.layer3[0].conv2.weight, body.features.layer3[0].conv2.weight)
    ident = identity(cfg, "anil")["model"]
    assert ident["pretrained"] == str(path) and ident["drop_rate"] == 0.1
    plain = identity(_cfg(fewshot_folder), "anil")["model"]
    assert "pretrained" not in plain and "drop_rate" not in plain and "widths" in plain  # changed from default
    wrn = _cfg(fewshot_folder).override({"model.name": "wrn28_10"})
    assert isinstance(build_algorithm(wrn, family).model, WRN28_10)


def test_config_mistakes_are_named(tmp_path, fewshot_folder):
    from innerloop.training.config import ConfigError
    from innerloop.training.run import build_algorithm, build_family

    with pytest.raises(ConfigError, match=r"model\.widths = \[4, 4\] is invalid: give four widths"):
        _cfg(fewshot_folder, widths=[4, 4])
    with pytest.raises(ConfigError, match=r"model\.drop_rate = 0\.1 is invalid: only resnet12 and wrn28_10"):
        _cfg(fewshot_folder, name="conv4", drop_rate=0.1)
    cfg = _cfg(fewshot_folder, pretrained=str(tmp_path / "absent.pt"))
    with pytest.raises(ConfigError, match=r"model\.pretrained = .*absent\.pt.*not found"):
        build_algorithm(cfg, build_family(cfg))


def test_a_metaoptnet_checkpoint_loads_as_the_resnet12_docstring_says(tmp_path):
    """MetaOptNet saves ``{"embedding": DataParallel(net).state_dict(), "head": ...}``: keys
    ``module.layer1.0.conv1.weight``, no ``encoder.``."""
    torch.manual_seed(0)
    trained = ResNet12(3, 0, TINY, 16, track_running_stats=True)
    body = {f"module.{k[len('features.'):]}": v for k, v in trained.state_dict().items()}
    path = _save(tmp_path / "best_model.pth", {"embedding": body, "head": {"scale": torch.ones(1)}})
    model = ResNet12(3, 0, TINY, 16, track_running_stats=True)
    report = load_pretrained(model, path, key="embedding", prefix="module.", rename={"": "features."})
    assert len(report.loaded) == len(body) and not report.missing and not report.unexpected
    conv = "features.layer3.0.downsample.0.weight"
    assert torch.equal(model.get_parameter(conv), trained.get_parameter(conv))
