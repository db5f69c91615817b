"""The settings schema is the one source: the shipped YAML, the docs table, the launch arguments and the command-line
options are generated from it and must not drift; values are checked with messages that name the setting."""
import argparse
import dataclasses

import pytest
import yaml

from fol_ros import config as cfg
from fol_ros import schema
from fol_ros.commands import eval as eval_cmd
from fol_ros.commands import map as map_cmd
from fol_ros.errors import ConfigError


def test_every_field_is_declared_with_metadata():
    classes = [cfg.NodeSettings, *schema.GROUPS.values()]
    n_fields = sum(len(dataclasses.fields(c)) for c in classes)
    params = schema.parameters()
    assert len(params) == n_fields and len({p.name for p in params}) == n_fields
    for p in params:
        assert p.doc and p.kind in ('bool', 'int', 'float', 'str', 'int[]', 'float[]'), p


def test_shipped_yaml_is_what_the_schema_generates(repo_root):
    text = (repo_root / 'config' / 'fol_ros.yaml').read_text()
    assert text == schema.render_yaml(), 'config/fol_ros.yaml drifted: run `fol-ros config yaml --write`'
    values = yaml.safe_load(text)['/**']['ros__parameters']
    assert schema.pipeline_config(values) == cfg.PipelineConfig()
    assert schema.node_settings({**values, 'map_path': 'm'}) == cfg.NodeSettings(map_path='m')
    assert '/home' not in text and '/work' not in text


def test_docs_table_is_what_the_schema_generates(repo_root):
    text = (repo_root / 'docs' / 'node.md').read_text()
    assert schema.splice_table(text) == text, 'docs/node.md drifted: run `fol-ros config docs --write`'
    for p in schema.parameters():
        assert f'| `{p.name}` |' in text


def test_launch_arguments_target_real_parameters():
    names = schema.by_name()
    args = schema.launch_arguments()
    assert {a for a, _, _, _ in args} >= {'map_path', 'image_topic', 'compressed', 'mode', 'checkpoint'}
    assert all(param in names for _, param, _, _ in args)


@pytest.mark.parametrize('values, match', [
    ({'gate.min_local_matches': 2.5}, 'gate.min_local_matches=2.5 has the wrong type'),
    ({'gate.min_local_matches': -3}, 'gate: min_local_matches=-3 must be >= 0'),
    ({'rerank.similarity_threshold': 1.5}, 'similarity_threshold=1.5 must be <= 1'),
    ({'search.index_type': 'lsh'}, "index_type='lsh' is not one of flat, ivf, hnsw"),
    ({'model.input_size': [300, 300]}, 'model: input size 300x300'),
    ({'gate.thresholds': 'maybe'}, 'thresholds'),
])
def test_bad_values_name_the_setting(values, match):
    with pytest.raises(ConfigError, match=match):
        schema.pipeline_config(values)


def test_params_file_refuses_unknown_names(tmp_path):
    f = tmp_path / 'p.yaml'
    f.write_text('x:\n  ros__parameters:\n    gate:\n      min_local_matchs: 3\n    use_sim_time: true\n')
    with pytest.raises(ConfigError, match='gate.min_local_matchs .did you mean gate.min_local_matches'):
        schema.read_params_file(f)
    f.write_text('x:\n  ros__parameters:\n    gate:\n      min_local_matches: 3\n    use_sim_time: true\n')
    assert schema.read_params_file(f) == {'gate.min_local_matches': 3}


@pytest.mark.parametrize('register, argv', [
    (map_cmd.register, ['map', 'build', '--images', 'x', '--out', 'm']),
    (eval_cmd.register, ['eval', '--bag', 'b', '--out', 'r.json']),
])
def test_cli_options_come_from_the_schema(tmp_path, register, argv):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    # schema default < params file < option; aliases (--size) and full names both work
    f = tmp_path / 'p.yaml'
    f.write_text('/**:\n  ros__parameters:\n    keyframe.min_interval_s: 4.0\n    model.input_size: [294, 294]\n')
    args = parser.parse_args([*argv, '--params', str(f), '--size', '336', '--keyframe.novelty_threshold', '0.5'])
    config = schema.config_from_args(args)
    assert config.model.input_size == (336, 336)
    assert config.keyframe == cfg.KeyframeConfig(min_interval_s=4.0, novelty_threshold=0.5)
    # without --params: the shipped YAML, which equals the schema defaults (so eval --bag runs what the node runs)
    assert schema.config_from_args(parser.parse_args(argv)) == cfg.PipelineConfig()
    with pytest.raises(SystemExit):
        parser.parse_args([*argv, '--search.index_type', 'lsh'])
