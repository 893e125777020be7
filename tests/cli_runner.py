"""Running the ``ipmt-fast`` command line in-process, for the tests that drive it."""
import contextlib
import io

from ipmt_fast.cli import main


def run_cli(*argv):
    """(exit code, stdout, stderr) of an in-process ``ipmt-fast`` call."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as exit_:
            code = exit_.code
    return code, out.getvalue(), err.getvalue()
