"""What train.py and evaluate.py share: stage lists and turning bad input into one line + exit 2."""
from __future__ import annotations

import functools
import sys

from absl import flags, logging

EXIT_BAD_INPUT = 2
IMPLEMENTED_STAGES = (1, 2, 3)


def parse_stages(text: str | None, default) -> tuple[int, ...]:
    if text is None or text == "":
        return tuple(int(s) for s in default)
    try:
        stages = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise ValueError(f"--stages must be a comma-separated list of stage numbers, got {text!r}") \
            from None
    bad = [s for s in stages if s not in (1, 2, 3)]
    if bad:
        raise ValueError(f"--stages: unknown stage(s) {bad}; the stages are 1, 2, 3")
    return stages


def user_errors(main):
    """Bad configs, paths or checkpoints end with `error: <message>` on stderr and exit code 2."""
    @functools.wraps(main)
    def wrapped(argv):
        try:
            return main(argv)
        except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError) as e:
            logging.flush()
            print(f"error: {e}", file=sys.stderr)
            sys.exit(EXIT_BAD_INPUT)
    return wrapped


def _one_line(text: str) -> str:
    """ml_collections' messages come as nested reprs ('\\'step\\'\\nDid you mean ...'): unescaped
    and squashed to one line."""
    text = " ".join(text.replace("\\n", " ").replace("\\'", "'").replace('\\"', '"').split())
    if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":  # the outer repr quotes
        text = text[1:-1]
    return text


def parse_flags(argv):
    """absl flags parser for app.run: a bad flag, config file or override -> one line, exit 2.

    Besides absl's own errors, ml_collections raises AttributeError / KeyError for an override
    of a field the config lacks, and the config file's own exception (SyntaxError, ...) when it
    cannot be imported."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        message = str(e)
    except (AttributeError, KeyError) as e:
        overrides = [a for a in argv[1:] if a.startswith("--config.")]
        message = (f"a --config override names a field the config does not have "
                   f"({_one_line(str(e))}); overrides given: {' '.join(overrides)}")
    except Exception as e:  # noqa: BLE001  the config file's own import error
        message = f"the config file could not be loaded: {type(e).__name__}: {e}"
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)


def load_config(flag_values):
    """FLAGS.config; ml_collections loads the file lazily, so a missing or broken config file
    surfaces here (as OSError) and becomes a ValueError with a one-line message."""
    try:
        config = flag_values.config
        config.keys()  # the lazily loaded config raises only on first use
        return config
    except OSError as e:
        raise ValueError(" ".join(str(e).split())) from None
