"""GeometryConfig: the note's defaults, YAML loading, and one clear sentence per bad value."""

import dataclasses

import pytest

from geocache import GeometryConfig


def test_defaults_follow_the_design_note():
    cfg = GeometryConfig()
    assert (cfg.kl_threshold, cfg.final_kl_threshold, cfg.kl_warmup_steps) == (0.15, 0.08, 1000)
    assert (cfg.dh_threshold, cfg.cal_threshold) == (0.1, 0.05)
    # λ's at the low end of the note's recommended ranges
    assert 0.1 <= cfg.lambda_kl <= 0.5 and 0.2 <= cfg.lambda_cal <= 1.0 and 0.1 <= cfg.lambda_entropy <= 0.3
    assert cfg.kl_direction == "forward"


def test_every_field_has_help():
    for f in dataclasses.fields(GeometryConfig):
        assert len(f.metadata.get("help", "")) > 10, f.name


def test_loads_from_yaml_section_or_top_level(tmp_path):
    (tmp_path / "a.yaml").write_text("geometry:\n  lambda_kl: 0.3\n  kl_direction: reverse\nother: 1\n")
    (tmp_path / "b.yaml").write_text("lambda_cal: 0.9\nfinal_kl_threshold: null\n")
    a, b = GeometryConfig.from_yaml(tmp_path / "a.yaml"), GeometryConfig.from_yaml(tmp_path / "b.yaml")
    assert (a.lambda_kl, a.kl_direction) == (0.3, "reverse")
    assert (b.lambda_cal, b.final_kl_threshold) == (0.9, None)
    assert GeometryConfig.from_dict(a.to_dict()) == a


@pytest.mark.parametrize(
    "text,message",
    [
        ("lambda_kll: 0.3\n", r"unknown geometry option\(s\) \['lambda_kll'\] \(did you mean: lambda_kll → lambda_kl\?\)"),
        ("lambda_kl: -0.3\n", "lambda_kl=-0.3 must be a finite number >= 0"),
        ("lambda_kl: .nan\n", "lambda_kl=nan must be a finite number >= 0"),
        ("kl_direction: sideways\n", "kl_direction='sideways' must be one of forward, reverse"),
        ("kl_estimator: topk\n", "kl_estimator='topk' must be one of topk_tail, topk_sampled, topk_cv, topk_hybrid, topk_renorm"),
        ("kl_threshold: 0.05\nfinal_kl_threshold: 0.1\n", "final_kl_threshold=0.1 is above kl_threshold=0.05"),
        ("kl_warmup_steps: 0\n", "kl_warmup_steps=0 must be a positive integer"),
        ("chunk_size: -4\n", "chunk_size=-4 must be a positive integer or null"),
        ("compile_loss: sometimes\n", "compile_loss='sometimes' must be true or false"),
        ("- 1\n- 2\n", "must hold a mapping, not list"),
        ("a: [1\n", "is not valid YAML"),
    ],
)
def test_bad_values_are_one_clear_sentence(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        GeometryConfig.from_yaml(path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml' does not exist"):
        GeometryConfig.from_yaml(tmp_path / "nope.yaml")
