"""JDTrainingArguments: CLI/JSON/YAML parsing, validation, serialisation."""

from __future__ import annotations

import json

import pytest
from transformers import HfArgumentParser

from hf_jd import JDTrainingArguments
from hf_jd.aggregation import aggregator_names


def parse(argv: list[str]) -> JDTrainingArguments:
    (args,) = HfArgumentParser(JDTrainingArguments).parse_args_into_dataclasses(argv)
    return args


def test_every_jd_field_parses_from_the_command_line(tmp_path):
    args = parse(
        [
            "--output_dir",
            str(tmp_path),
            "--use_cpu",
            "--report_to",
            "none",
            "--aggregator",
            "mgda",
            "--aggregator_kwargs",
            '{"epsilon": 0.01, "max_iters": 50}',
            "--jd_objectives",
            "per_task",
            "--jd_engine",
            "jacobian",
            "--jd_scope",
            "local",
            "--jd_loss_type",
            "causal_lm",
            "--jd_parallel_chunk_size",
            "4",
            "--jd_check_rank_consistency",
        ]
    )
    assert args.aggregator == "mgda"
    assert args.aggregator_kwargs == {"epsilon": 0.01, "max_iters": 50}
    assert (args.jd_objectives, args.jd_engine, args.jd_scope) == ("per_task", "jacobian", "local")
    assert args.jd_loss_type == "causal_lm"
    assert args.jd_parallel_chunk_size == 4
    assert args.jd_check_rank_consistency is True
    assert args.build_aggregator().gramian_weighting.epsilon == 0.01


def test_defaults(tmp_path):
    args = parse(["--output_dir", str(tmp_path), "--use_cpu"])
    assert (args.aggregator, args.aggregator_kwargs) == ("upgrad", {})
    assert (args.jd_objectives, args.jd_engine, args.jd_scope) == ("per_example", "auto", "global")


def test_preference_vector_json(tmp_path):
    args = parse(
        ["--output_dir", str(tmp_path), "--use_cpu", "--aggregator_kwargs", '{"pref_vector": [1, 2]}']
    )
    assert args.build_aggregator().gramian_weighting.pref_vector.tolist() == [1.0, 2.0]


def test_unknown_aggregator_on_the_cli_lists_choices(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse(["--output_dir", str(tmp_path), "--aggregator", "adam"])
    err = capsys.readouterr().err
    assert "invalid choice" in err and "upgrad" in err and "mgda" in err


def test_help_lists_aggregators(capsys):
    with pytest.raises(SystemExit):
        parse(["--help"])
    out = capsys.readouterr().out
    for name in aggregator_names():
        assert name in out


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"aggregator": "adam"}, "Valid aggregators: upgrad"),
        ({"aggregator_kwargs": "{not json"}, "must be a JSON object"),
        ({"aggregator_kwargs": '{"bogus": 1}'}, "Invalid aggregator_kwargs for 'upgrad'"),
        ({"aggregator": "trimmed_mean", "jd_engine": "gramian"}, "needs the explicit Jacobian"),
        ({"jd_engine": "fast"}, "jd_engine='fast' is not valid"),
        ({"jd_parallel_chunk_size": 0}, "positive integer"),
    ],
)
def test_invalid_settings_fail_at_construction(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        JDTrainingArguments(output_dir=str(tmp_path), use_cpu=True, **overrides)


def test_json_and_yaml_files(tmp_path):
    values = {
        "output_dir": str(tmp_path),
        "use_cpu": True,
        "aggregator": "dualproj",
        "aggregator_kwargs": {"pref_vector": [1, 1, 2]},
        "jd_objectives": "per_task",
    }
    json_path = tmp_path / "args.json"
    json_path.write_text(json.dumps(values))
    (from_json,) = HfArgumentParser(JDTrainingArguments).parse_json_file(str(json_path))
    yaml_path = tmp_path / "args.yaml"
    yaml_path.write_text(
        f"output_dir: {tmp_path}\nuse_cpu: true\naggregator: dualproj\n"
        "aggregator_kwargs:\n  pref_vector: [1, 1, 2]\njd_objectives: per_task\n"
    )
    (from_yaml,) = HfArgumentParser(JDTrainingArguments).parse_yaml_file(str(yaml_path))
    for args in (from_json, from_yaml):
        assert args.aggregator == "dualproj"
        assert args.aggregator_kwargs == {"pref_vector": [1, 1, 2]}
        assert args.jd_objectives == "per_task"


def test_serialised_in_to_dict_and_json_without_hub_token_in_repr(tmp_path):
    args = JDTrainingArguments(
        output_dir=str(tmp_path),
        use_cpu=True,
        aggregator="pcgrad",
        jd_scope="local",
        hub_token="secret-token",
    )
    as_dict = args.to_dict()
    assert as_dict["aggregator"] == "pcgrad" and as_dict["jd_scope"] == "local"
    assert json.loads(args.to_json_string())["aggregator"] == "pcgrad"
    assert "secret-token" not in repr(args)


def test_the_aggregator_validated_at_construction_is_the_one_the_first_caller_gets(tmp_path):
    args = JDTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], aggregator="gradvac")
    validated = args._validated_aggregator[2]
    first, second = args.build_aggregator(), args.build_aggregator()
    assert first is validated  # built once for the first trainer, not once to validate and again to train
    assert second is not first and type(second) is type(first)  # a later trainer never shares its state


def test_changed_settings_are_not_served_the_stale_aggregator(tmp_path):
    args = JDTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], aggregator="upgrad")
    args.aggregator = "mgda"
    assert type(args.build_aggregator()).__name__ == "MGDA"


def test_aggregator_kwargs_is_one_of_the_dict_fields_of_training_arguments(tmp_path):
    assert "aggregator_kwargs" in JDTrainingArguments._VALID_DICT_FIELDS
    args = parse(
        ["--output_dir", str(tmp_path), "--aggregator", "mgda", "--aggregator_kwargs", '{"epsilon": 0.01}']
    )
    assert args.aggregator_kwargs == {"epsilon": 0.01}
    for not_an_object in ("[1, 2]", "epsilon=0.01"):
        with pytest.raises(ValueError, match="must be a dict or a JSON object string"):
            JDTrainingArguments(output_dir=str(tmp_path), aggregator_kwargs=not_an_object)
    with pytest.raises(ValueError, match="must be a JSON object"):
        JDTrainingArguments(output_dir=str(tmp_path), aggregator_kwargs='{"epsilon": }')
