"""Everything generated from the settings declared in fol_ros/config.py (ROS-free).

One `Param` per setting: node settings by their field name (`map_path`), pipeline settings as `<stage>.<field>`
(`gate.min_local_matches`), the names the ROS parameters, the YAML file, the launch arguments' targets and the
command-line options (`--gate.min_local_matches`) all share. From them come:
- `coerce` / `validate_fields`: type, range and choice checks with messages that name the setting;
- `read_params_file`: a node parameter YAML as flat values (unknown names refused with the closest match);
- `pipeline_config` / `node_settings`: flat values -> the typed dataclasses;
- `render_yaml` (config/fol_ros.yaml), `render_table` (docs/node.md), `launch_arguments` (launch file);
- `add_cli_options` / `config_from_args`: the options of every command that takes pipeline settings.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
from dataclasses import dataclass
from pathlib import Path

from fol_ros import config as cfg
from fol_ros.errors import ConfigError

GROUPS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(cfg.PipelineConfig)}
PACKAGE_ROOT = Path(__file__).resolve().parents[1]
YAML_HEADER = """\
# Parameters of place_recognition_node (fol_ros): every setting with its default and meaning.
# GENERATED from fol_ros/config.py by `fol-ros config yaml --write`; do not edit here (a test compares the two):
# copy it for your robot and pass the copy as params_file:=... (launch) or --params-file (node) / --params (CLI).
# [live] settings may be changed with `ros2 param set` while the node runs; the others are read at configure.
# Paths are relative to the working directory or absolute at run time. `/**` matches any node name or namespace.
"""
_SECTION_TITLES = {
    '': 'node: start-up, input, output (NodeSettings)',
    'model': 'model (ModelConfig)', 'engine': 'inference engine (EngineConfig)',
    'search': 'global retrieval (SearchConfig)', 'rerank': 'FoL local re-ranking (RerankConfig)',
    'verify': 'geometric verification (VerifyConfig)', 'gate': 'loop-closure gate (GateConfig)',
    'keyframe': 'online-mapping keyframes (KeyframeConfig); a frame joins when any enabled criterion holds'}


@dataclass(frozen=True)
class Param:
    """One setting as every consumer sees it."""

    name: str
    group: str            # '' for node settings
    field: str
    kind: str             # 'bool' | 'int' | 'float' | 'str' | 'int[]' | 'float[]'
    default: object
    doc: str
    unit: str = ''
    choices: tuple = ()
    low: float | None = None
    high: float | None = None
    live: bool = False
    launch: str = ''
    cli: tuple[str, ...] = ()
    optional: bool = False

    @property
    def range_text(self) -> str:
        """'a | b | c' for choices, '>= 1', '[0, 1]' for ranges, '' when unconstrained."""
        if self.choices:
            return ' | '.join(repr(c) if c == '' else str(c) for c in self.choices)
        if self.low is not None and self.high is not None:
            return f'[{_num(self.low)}, {_num(self.high)}]'
        if self.low is not None:
            return f'>= {_num(self.low)}'
        if self.high is not None:
            return f'<= {_num(self.high)}'
        return ''


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _kind(default: object, optional: bool) -> str:
    if optional:
        return 'float[]'
    if isinstance(default, bool):
        return 'bool'
    if isinstance(default, int):
        return 'int'
    if isinstance(default, float):
        return 'float'
    if isinstance(default, str):
        return 'str'
    if isinstance(default, tuple):
        return 'int[]' if default and isinstance(default[0], int) else 'float[]'
    raise TypeError(f'setting default {default!r} has no parameter type')


def _params_of(cls: type, group: str) -> list[Param]:
    out = []
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if 'doc' not in meta:
            raise TypeError(f'{cls.__name__}.{f.name} is not declared with config.setting()')
        name = f'{group}.{f.name}' if group else f.name
        out.append(Param(name=name, group=group, field=f.name, kind=_kind(f.default, meta['optional']),
                         default=f.default, doc=meta['doc'], unit=meta['unit'], choices=meta['choices'],
                         low=meta['low'], high=meta['high'], live=meta['live'], launch=meta['launch'],
                         cli=meta['cli'], optional=meta['optional']))
    return out


def parameters() -> tuple[Param, ...]:
    """Every setting: node settings first, then the pipeline groups in pipeline order."""
    out = _params_of(cfg.NodeSettings, '')
    for group, cls in GROUPS.items():
        out += _params_of(cls, group)
    return tuple(out)


def by_name() -> dict[str, Param]:
    """Settings keyed by parameter name."""
    return {p.name: p for p in parameters()}


# checks ----------------------------------------------------------------------------------------------------------
def coerce(param: Param, value: object) -> object:
    """`value` converted to the setting's type (an int for a float setting is fine; 2.5 for an int is not).

    Raises:
        ConfigError: wrong type, naming the parameter and the expected type.
    """
    if value is None and param.optional:
        return None
    try:
        if param.kind == 'bool' and isinstance(value, bool):
            return value
        if param.kind == 'int' and not isinstance(value, (bool, str, list, tuple)):
            if float(value).is_integer():
                return int(value)
        if param.kind == 'float' and not isinstance(value, (bool, str, list, tuple)):
            return float(value)
        if param.kind == 'str' and isinstance(value, str):
            return value
        if param.kind.endswith('[]') and isinstance(value, (list, tuple)):
            if any(isinstance(v, (bool, str)) for v in value):
                raise TypeError
            if param.kind == 'int[]':
                if any(not float(v).is_integer() for v in value):
                    raise TypeError
                return tuple(int(v) for v in value)
            values = tuple(float(v) for v in value)
            return values if values or not param.optional else None
    except (TypeError, ValueError):
        pass
    example = '[]' if param.optional else repr(list(param.default) if isinstance(param.default, tuple)
                                               else param.default)
    raise ConfigError(f'parameter {param.name}={value!r} has the wrong type; expected {param.kind} like {example}')


def check_value(param: Param, value: object) -> str:
    """'' if `value` (already coerced) is within the setting's choices and range, else the reason."""
    if param.choices and value not in param.choices:
        return f'{param.field}={value!r} is not one of {", ".join(map(str, param.choices))}'
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if math.isnan(value):
            return f'{param.field}=nan is not a number'
        if param.low is not None and value < param.low:
            return f'{param.field}={value} must be >= {_num(param.low)}'
        if param.high is not None and value > param.high:
            return f'{param.field}={value} must be <= {_num(param.high)}'
    return ''


def validate_fields(obj: object) -> None:
    """Range and choice checks of a config dataclass instance (called from its __post_init__)."""
    group = next((g for g, cls in GROUPS.items() if isinstance(obj, cls)), '')
    for param in _params_of(type(obj), group):
        reason = check_value(param, getattr(obj, param.field))
        if reason:
            raise ConfigError(reason)


# flat values <-> dataclasses ------------------------------------------------------------------------------------
def pipeline_config(values: dict[str, object], base: cfg.PipelineConfig | None = None) -> cfg.PipelineConfig:
    """A PipelineConfig from flat `<group>.<field>` values (others ignored) over `base` (default: the defaults).

    Raises:
        ConfigError: a value of the wrong type or out of range, with the parameter named.
    """
    base = base or cfg.PipelineConfig()
    params = by_name()
    groups = {}
    for group in GROUPS:
        current = getattr(base, group)
        changes = {p.field: coerce(p, values[p.name]) for p in params.values()
                   if p.group == group and p.name in values}
        try:
            groups[group] = dataclasses.replace(current, **changes) if changes else current
        except ConfigError as exc:
            raise ConfigError(f'{group}: {exc}') from exc
    return cfg.PipelineConfig(**groups)


def node_settings(values: dict[str, object]) -> cfg.NodeSettings:
    """NodeSettings from flat values (others ignored); defaults where a value is missing."""
    params = by_name()
    kwargs = {p.field: coerce(p, values[p.name]) for p in params.values() if p.group == '' and p.name in values}
    return cfg.NodeSettings(**kwargs)


def flat_values(settings: cfg.NodeSettings | None, config: cfg.PipelineConfig) -> dict[str, object]:
    """The inverse: every parameter name -> its value in `settings` / `config`."""
    out: dict[str, object] = {}
    for p in parameters():
        if p.group:
            out[p.name] = getattr(getattr(config, p.group), p.field)
        elif settings is not None:
            out[p.name] = getattr(settings, p.field)
    return out


def closest(name: str, known) -> str:
    """The known name a typo most likely meant ('map' -> 'map_path'), or ''."""
    known = sorted(known)
    contains = [k for k in known if name and (k.startswith(name) or name in k.split('.')[-1])]
    if contains:
        return min(contains, key=len)
    close = difflib.get_close_matches(name, known, n=1)
    return close[0] if close else ''


def unknown_names(names, known) -> list[str]:
    """Messages for names not in `known`, each with the closest known name when there is one."""
    out = []
    for name in names:
        if name not in known:
            close = closest(name, known)
            out.append(f'{name}' + (f' (did you mean {close}?)' if close else ''))
    return out


def read_params_file(path: str | Path) -> dict[str, object]:
    """The `ros__parameters` of a node parameter YAML as flat `name -> value` (nested groups joined by '.').

    Raises:
        ConfigError: unreadable file, no ros__parameters section, or a name that is no fol_ros setting.
    """
    import yaml

    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f'cannot read node parameters {path}: {exc}') from exc
    params = next((v['ros__parameters'] for v in (doc or {}).values()
                   if isinstance(v, dict) and isinstance(v.get('ros__parameters'), dict)), None) \
        if isinstance(doc, dict) else None
    if params is None:
        raise ConfigError(f'{path}: no "<node name>: ros__parameters:" section')
    flat: dict[str, object] = {}

    def walk(prefix: str, node: dict) -> None:
        for k, v in node.items():
            name = f'{prefix}.{k}' if prefix else str(k)
            walk(name, v) if isinstance(v, dict) else flat.__setitem__(name, v)

    walk('', params)
    known = set(by_name()) | {'use_sim_time'}
    bad = unknown_names(flat, known)
    if bad:
        raise ConfigError(f'{path}: unknown parameter(s) {", ".join(bad)}')
    flat.pop('use_sim_time', None)
    return flat


def default_params_file() -> Path | None:
    """The shipped config/fol_ros.yaml: beside the sources, or in the installed package share; None if absent."""
    beside = PACKAGE_ROOT / 'config' / 'fol_ros.yaml'
    if beside.is_file():
        return beside
    try:   # colcon install: <prefix>/share/fol_ros/config/fol_ros.yaml
        from ament_index_python.packages import get_package_share_directory
        installed = Path(get_package_share_directory('fol_ros')) / 'config' / 'fol_ros.yaml'
    except (ImportError, LookupError, OSError):   # not installed, or no AMENT_PREFIX_PATH
        return None
    return installed if installed.is_file() else None


# generated text -------------------------------------------------------------------------------------------------
def _yaml_value(value: object) -> str:
    if isinstance(value, bool):
        return 'true' if value else 'false'
    if isinstance(value, tuple):
        return '[' + ', '.join(_yaml_value(v) for v in value) + ']'
    if isinstance(value, str):
        import yaml
        plain = value and yaml.safe_load(value) == value and value.strip() == value and ':' not in value
        return value if plain else "'" + value.replace("'", "''") + "'"
    return repr(value)


def _annotation(p: Param) -> str:
    extra = [x for x in (f'[{p.unit}]' if p.unit else '', f'({p.range_text})' if p.range_text and not p.choices
                         else '',
                         '[live]' if p.live else '') if x]
    return p.doc + (' ' + ' '.join(extra) if extra else '')


def render_yaml() -> str:
    """config/fol_ros.yaml: every parameter at its default, grouped by stage, each line with its meaning."""
    lines = [YAML_HEADER.rstrip('\n'), '/**:', '  ros__parameters:']
    group = None
    for p in parameters():
        if p.group != group:
            group = p.group
            lines.append(f'    # ---- {_SECTION_TITLES[group]} ' + '-' * max(0, 100 - len(_SECTION_TITLES[group])))
        if p.optional:
            # an empty list cannot be typed in a params file: documented, left unset
            lines.append(f'    # {p.name}: [...]  # {_annotation(p)}')
            continue
        entry = f'    {p.name}: {_yaml_value(p.default)}'
        lines.append(f'{entry:<44}  # {_annotation(p)}')
    return '\n'.join(lines) + '\n'


def render_table() -> str:
    """The parameter table of docs/node.md (Markdown)."""
    rows = ['| parameter | type | default | unit | allowed | live | launch argument | meaning |',
            '|---|---|---|---|---|---|---|---|']
    for p in parameters():
        default = 'unset' if p.optional else _yaml_value(p.default)
        allowed = p.range_text.replace(' | ', ', ')   # a bare | would split the Markdown cell
        rows.append(f'| `{p.name}` | {p.kind} | `{default}` | {p.unit} | {allowed} | '
                    f'{"yes" if p.live else ""} | {f"`{p.launch}`" if p.launch else ""} | '
                    f'{p.doc.replace("|", "/")} |')
    return '\n'.join(rows) + '\n'


TABLE_BEGIN = '<!-- parameters: generated by `fol-ros config docs --write`, do not edit -->'
TABLE_END = '<!-- parameters: end -->'


def splice_table(markdown: str) -> str:
    """`markdown` with the text between TABLE_BEGIN and TABLE_END replaced by `render_table()`."""
    start, end = markdown.find(TABLE_BEGIN), markdown.find(TABLE_END)
    if start < 0 or end < start:
        raise ConfigError('docs/node.md has no generated parameter table markers')
    return markdown[:start + len(TABLE_BEGIN)] + '\n\n' + render_table() + '\n' + markdown[end:]


def launch_arguments() -> list[tuple[str, str, str, str]]:
    """(launch argument, parameter, kind, doc) for every setting the launch file exposes."""
    return [(p.launch, p.name, p.kind, p.doc) for p in parameters() if p.launch]


# command line ---------------------------------------------------------------------------------------------------
def parse_bool(text: str, name: str = 'value') -> bool:
    """'true/1/yes' or 'false/0/no' (any case), as launch arguments and command-line options spell booleans."""
    if text.lower() in ('true', '1', 'yes'):
        return True
    if text.lower() in ('false', '0', 'no'):
        return False
    raise ValueError(f'{name}:={text!r} must be true or false')


def add_cli_options(parser: argparse.ArgumentParser, groups: tuple[str, ...], *,
                    params_option: bool = True) -> None:
    """Add `--<group>.<field>` (plus the setting's aliases) for every setting of `groups`, and `--params FILE`.

    Options not given stay absent from the namespace, so the precedence is: schema default < params file < option.
    """
    if params_option:
        parser.add_argument('--params', default=None, metavar='YAML',
                            help='node parameter file whose pipeline settings apply (default: the shipped '
                                 "config/fol_ros.yaml, the node's own defaults); '' = schema defaults only")
    for group in groups:
        section = parser.add_argument_group(f'{group} settings ({_SECTION_TITLES[group]}; see docs/node.md)')
        for p in parameters():
            if p.group != group:
                continue
            kwargs: dict = {'dest': p.name, 'default': argparse.SUPPRESS, 'metavar': p.field.upper()}
            if p.kind == 'bool':
                kwargs.update(type=parse_bool, metavar='BOOL')
            elif p.kind.endswith('[]'):
                kwargs.update(type=int if p.kind == 'int[]' else float, nargs='+')
            else:
                kwargs['type'] = {'int': int, 'float': float, 'str': str}[p.kind]
            if p.choices:
                kwargs['choices'] = list(p.choices)
            default = 'unset' if p.optional else _yaml_value(p.default)
            kwargs['help'] = f'{p.doc}' + (f' [{p.unit}]' if p.unit else '') + f' (default: {default})'
            section.add_argument(f'--{p.name}', *p.cli, **kwargs)


def config_from_args(args: argparse.Namespace, base: cfg.PipelineConfig | None = None) -> cfg.PipelineConfig:
    """PipelineConfig: schema defaults (or `base`), then the params file, then the options given."""
    params_file = getattr(args, 'params', None)
    if params_file is None:
        path = default_params_file()
        params_file = str(path) if path else ''
    values = read_params_file(params_file) if params_file else {}
    values.update({p.name: getattr(args, p.name) for p in parameters() if p.group and hasattr(args, p.name)})
    return pipeline_config(values, base)
