"""
What the command-line tools (train.py, evaluate.py, sample.py) share: settings from config
files and --name=value / --name value arguments, --help built from a settings dataclass, range
checks, and errors of one or two lines instead of a traceback.

    from cli import run
    if __name__ == "__main__":
        run(main)          # QUIETSTAR_DEBUG=1 or --debug shows the full traceback
"""

import argparse
import ast
import difflib
import inspect
import os
import re
import sys
from dataclasses import fields

DEBUG_VARIABLE = "QUIETSTAR_DEBUG"


def run(main, *args):
    """Call main(*args); an exception becomes one or two lines on stderr and exit status 1.
    --debug on the command line (or QUIETSTAR_DEBUG=1) keeps the traceback."""
    debug = os.environ.get(DEBUG_VARIABLE, "") not in ("", "0") or "--debug" in sys.argv
    if "--debug" in sys.argv:
        sys.argv.remove("--debug")
    try:
        return main(*args)
    except KeyboardInterrupt:
        if debug:
            raise
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as e:
        if debug:
            raise
        lines = str(e).strip().splitlines() or [""]
        kind = "" if isinstance(e, (ValueError, OSError)) else f"{type(e).__name__}: "
        print(f"error: {kind}{lines[0]}" + (f"\n{lines[1]}" if len(lines) > 1 else ""), file=sys.stderr)
        print(f"(run with --debug or {DEBUG_VARIABLE}=1 for the traceback)", file=sys.stderr)
        sys.exit(1)


# -----------------------------------------------------------------------------
# checks shared by the tools

def check_device(device):
    """'cpu', 'cuda', 'cuda:N' or 'mps', and usable on this machine; else a one-line error."""
    import torch                   # here, so that tools without a model (plot_run.py) start fast
    if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", device):
        raise SystemExit(f"device={device!r}: expected cpu, cuda, cuda:N or mps")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            why = "this torch was built without CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise SystemExit(f"device={device}: CUDA is not available ({why}); use --device=cpu")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise SystemExit(f"device={device}: only {torch.cuda.device_count()} GPU(s) visible")
    if device == "mps" and not torch.backends.mps.is_available():
        raise SystemExit("device=mps: MPS is not available on this machine; use --device=cpu")
    return device


DTYPES = ("float32", "bfloat16", "float16")


def check_dtype(name, setting="dtype"):
    if name not in DTYPES:
        raise SystemExit(f"{setting}={name!r}: expected one of {', '.join(DTYPES)}")
    return name


def check_range(name, value, low=None, high=None, low_open=False):
    """Raise a one-line error unless low <= value <= high (low < value with low_open);
    NaN and infinity are always out of range."""
    ok = abs(value) != float("inf") and value == value and \
        (low is None or (value > low if low_open else value >= low)) and (high is None or value <= high)
    if not ok:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
        hi = "" if high is None else f"<= {high}"
        raise SystemExit(f"{name}={value!r}: must be a finite number {' and '.join(x for x in (lo, hi) if x)}")


def at_least(low):
    """An argparse type: an int >= low, with the allowed range in the message."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    parse.__name__ = f"integer >= {low}"
    return parse


def check_checkpoint_dir(path, option="--ckpt"):
    """A run's folder (out/) given where its checkpoint (out/ckpt) was meant: say so."""
    if os.path.isdir(path) and not any(os.path.exists(os.path.join(path, f)) for f in
                                       ("config.json", "params.json")):
        inner = os.path.join(path, "ckpt")
        if os.path.isdir(inner):
            raise SystemExit(f"{option} {path}: a training run's folder, not a checkpoint; "
                             f"did you mean {option} {inner}?")
    return path


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help: the description as written (its examples keep their lines) and every
    option's default after its description (not for flags, required options, or a default
    of none, which the description explains)."""

    def _get_help_string(self, action):
        default = action.default
        if action.required or default is None or default is False or default in ("", []) or \
                default is argparse.SUPPRESS or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def short_errors(parser):
    """Make an argparse parser's errors two short lines (its default also prints the whole
    usage, which for evaluate.py is ten lines)."""
    def error(message):
        sys.exit(f"{parser.prog}: {message}\n(see {parser.prog} --help)")
    parser.error = error
    return parser


# -----------------------------------------------------------------------------
# settings dataclasses: defaults <- config files <- --name=value or --name value

def read_overrides(argv):
    """{name: value} from config files and --name=value (or --name value) arguments, in order."""
    values, i = {}, 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if not arg.startswith("--"):
            values.update(read_config_file(arg))
            continue
        if "=" in arg:
            name, text = arg[2:].split("=", 1)
        elif i < len(argv) and not argv[i].startswith("--"):
            name, text = arg[2:], argv[i]
            i += 1
        else:
            raise SystemExit(f"{arg}: expected --name=value or --name value")
        try:
            values[name] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            values[name] = text                         # a plain string
    return values


def read_config_file(path):
    """The assignments of a settings file (plain Python, see config/)."""
    if not os.path.isfile(path):
        raise SystemExit(f"{path}: config file not found (settings are given as --name=value)")
    with open(path) as f:
        source = f.read()
    scope = {}
    try:
        exec(compile(source, path, "exec"), {}, scope)
    except SyntaxError as e:
        raise SystemExit(f"{path}:{e.lineno}: syntax error in config file: {e.msg}") from None
    except Exception as e:
        raise SystemExit(f"{path}: config file failed: {type(e).__name__}: {e}") from None
    return {k: v for k, v in scope.items() if not k.startswith("_") and not inspect.ismodule(v)}


def make_settings(cls, values):
    """A `cls` dataclass from {name: value}, each value type-checked (an int is accepted
    for a float, anything for a string)."""
    types = {f.name: f.type for f in fields(cls)}
    for name, value in values.items():
        if name not in types:
            close = difflib.get_close_matches(name, types, n=3)
            raise SystemExit(f"unknown setting {name!r}" + (f"; did you mean {' or '.join(close)}?" if close else "")
                             + " (--help lists every setting)")
        expected = types[name]
        if expected is float and (type(value) is int or value in ("inf", "-inf", "nan")):
            values[name] = value = float(value)      # inf and nan, to be refused by range checks
        if expected is str and type(value) is not str:
            values[name] = value = str(value)
        if type(value) is not expected:
            raise SystemExit(f"setting {name}={value!r}: expected {expected.__name__}, "
                             f"got {type(value).__name__}")
    return cls(**values)


def settings_help(cls, intro):
    """--help text: every field of the dataclass with its default and its source comment."""
    lines = [intro.strip(), "", "settings (--name=value or --name value; defaults shown):"]
    for line in inspect.getsource(cls).splitlines()[1:]:
        field = re.match(r"\s+(\w+): (\w+) = (.*?)(?:\s+#\s*(.*))?$", line)
        section = re.match(r"\s+#\s*(.*)$", line)
        if field:
            name, kind, default, comment = field.groups()
            value = getattr(cls, name)
            lines.append(f"  {f'--{name}={value!r}':<36} {kind:5s} {comment or ''}".rstrip())
        elif section:
            lines.append(f" {section.group(1)}")
    return "\n".join(lines)
