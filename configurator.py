"""
Strict nanoGPT-style configuration, the one command-line convention of every script here: config
files of plain Python assignments, then --key=value, applied in the order given; --help (anywhere)
prints every key, its value after the other arguments, and its meaning.

Every key must already exist in the script's defaults and keep its type (an int is accepted where a
float is expected; a key whose default is None takes any value; None is taken only there and for the
keys a script names as nullable). Unlike nanoGPT's configurator, a typo is an error that names the
closest key. Booleans are True/False (true/false, 1/0 also work).
"""
import ast
import os
import types

from common import UserError, closest

BOOLEAN_WORDS = {"true": True, "false": False, "1": True, "0": False}


class ConfigError(UserError):
    pass


def checked(key, value, defaults, where, nullable):
    """value, if key is known and value has its default's type (an int widened to a float)."""
    if key not in defaults:
        raise ConfigError(f"unknown config key '{key}' {where}{closest(key, defaults)}")
    default = defaults[key]
    if default is None or value is None and key in nullable:
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


def parse_value(text, default):
    """The value --key=text stands for, read as the default's type would be written."""
    if isinstance(default, str):
        return text  # --start=123 is the text "123"
    if isinstance(default, bool) and text.lower() in BOOLEAN_WORDS:
        return BOOLEAN_WORDS[text.lower()]
    if isinstance(default, float):
        try:
            return float(text)  # also nan and inf, for the script's own range checks to refuse by name
        except ValueError:
            pass
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text  # a bare word is a string: --device=cuda


def config_file(path):
    """The assignments of a config file (names starting with _, modules, functions and classes left out)."""
    if os.path.isdir(path) or path.endswith(".pt") and os.path.isfile(path):  # a run given where a config belongs
        run = os.path.isfile(path) or os.path.isfile(os.path.join(path, "ckpt.pt"))
        what = ("a checkpoint" if os.path.isfile(path) else "a run folder (it holds ckpt.pt)" if run
                else "a folder (a config file is a .py file of assignments)")
        raise ConfigError(f"'{path}' is not a config file but {what}" + (f": give it as --out_dir={path}" * run))
    if not os.path.isfile(path):
        raise ConfigError(f"config file '{path}' not found")
    namespace = {}
    try:
        with open(path) as f:
            exec(compile(f.read(), path, "exec"), {}, namespace)
    except (SyntaxError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file '{path}' is not valid Python: {e}") from None
    except Exception as e:  # the file runs code of its own; say where it went wrong
        raise ConfigError(f"config file '{path}' failed: {type(e).__name__}: {e}") from None
    return {key: value for key, value in namespace.items()
            if not key.startswith("_") and not isinstance(value, (types.ModuleType, types.FunctionType, type))}


def split_settings(settings):
    """(defaults, meanings) of a script's SETTINGS table {key: (default, meaning)}."""
    return ({key: default for key, (default, _) in settings.items()},
            {key: meaning for key, (_, meaning) in settings.items()})


def help_text(config, meanings, usage, ignored=()):
    """usage, then --key=value and its meaning per key, the ignored keys in one line at the end."""
    listed = {k: v for k, v in config.items() if k not in ignored}
    width = min(40, max(len(f"--{k}={v!r}") for k, v in listed.items()))
    lines = [usage.strip(), "", "keys (values after the config files given; --key=value overrides):"]
    for key, value in listed.items():
        shown, meaning = f"--{key}={value!r}", meanings.get(key, "")
        lines.append(f"  {shown:<{width}}  {meaning}" if len(shown) <= width
                     else f"  {shown}\n  {'':<{width}}  {meaning}")
    if ignored:
        lines += ["", f"accepted and ignored, so that a training config file works as is: {', '.join(ignored)}"]
    return "\n".join(line.rstrip() for line in lines)


def parse_config(defaults, argv, meanings=None, usage="", nullable=(), ignored=()):
    """defaults (dict) updated by config files and --key=value arguments; the keys in nullable also take
    None; ignored keys are accepted, unused, and listed by name only in --help."""
    config = dict(defaults)
    for arg in [arg for arg in argv if arg not in ("-h", "--help")]:
        if arg.startswith("--") and "=" not in arg:
            raise ConfigError(f"argument '{arg}' must be --key=value{closest(arg[2:], defaults)}")
        if arg.startswith("--"):
            key, text = arg[2:].split("=", 1)
            config[key] = checked(key, parse_value(text, defaults.get(key)), defaults, "on the command line", nullable)
        else:
            config.update({key: checked(key, value, defaults, f"in {arg}", nullable)
                           for key, value in config_file(arg).items()})
    if any(arg in ("-h", "--help") for arg in argv):
        print(help_text(config, meanings or {}, usage, ignored))
        raise SystemExit(0)
    return config
