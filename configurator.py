"""
Strict nanoGPT-style configuration: config files of plain Python assignments, then --key=value.

    python train.py config/fixed_min.py --batch_size=16 --compile=False

Every key must already exist in the script's defaults and keep its type (an int is accepted where a
float is expected). Unlike nanoGPT's configurator, a typo is an error that names the closest key.
"""
import ast
import difflib
import os
import types


class ConfigError(ValueError):
    pass


def _closest(key, known):
    match = difflib.get_close_matches(key, known, n=1)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _checked(key, value, defaults, where):
    if key not in defaults:
        raise ConfigError(f"unknown config key '{key}' {where}{_closest(key, list(defaults))}")
    default = defaults[key]
    if default is None or value is None:
        return value
    if isinstance(default, bool) or isinstance(value, bool):
        ok = isinstance(default, bool) and isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float))
        value = float(value) if ok else value
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ConfigError(f"config key '{key}' {where} must be {type(default).__name__} like its default "
                          f"{default!r}, got {type(value).__name__} {value!r}")
    return value


def _parse_value(text, default):
    if isinstance(default, str):
        return text  # --start=123 is the text "123"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word is a string: --device=cuda


def parse_config(defaults, argv):
    """defaults (dict) updated by config files and --key=value arguments, in the order given."""
    config = dict(defaults)
    for arg in argv:
        if arg in ("-h", "--help"):
            print("config keys and their defaults:\n" + "\n".join(f"  --{k}={v!r}" for k, v in defaults.items()))
            raise SystemExit(0)
        if arg.startswith("--"):
            if "=" not in arg:
                raise ConfigError(f"argument '{arg}' must be --key=value")
            key, text = arg[2:].split("=", 1)
            config[key] = _checked(key, _parse_value(text, defaults.get(key)), defaults, "on the command line")
            continue
        if not os.path.isfile(arg):
            raise ConfigError(f"config file '{arg}' not found")
        namespace = {}
        with open(arg) as f:
            exec(compile(f.read(), arg, "exec"), {}, namespace)
        for key, value in namespace.items():
            if key.startswith("_") or isinstance(value, (types.ModuleType, types.FunctionType, type)):
                continue
            config[key] = _checked(key, value, defaults, f"in {arg}")
    return config
