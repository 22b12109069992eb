"""Running one numbered notebook headless through papermill, inside the run folder, with its
cells' output streamed to the terminal as it happens.
Floor "pipeline": uses the errors and records (how progress bars draw)."""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path

from helpers.errors import HelpersError
from helpers.records import PROGRESS_ENV

NOTEBOOKS = Path(__file__).resolve().parent.parent.parent / "notebooks"
REPO = NOTEBOOKS.parent


class NotebookFailed(HelpersError):
    pass


@contextlib.contextmanager
def text_progress():
    """The kernels started inside draw their progress bars as text (helpers.records.progress_bar),
    which reaches the terminal; a widget would only be drawn by a notebook front end."""
    before = os.environ.get(PROGRESS_ENV)
    os.environ[PROGRESS_ENV] = "text"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(PROGRESS_ENV, None)
        else:
            os.environ[PROGRESS_ENV] = before


def run_notebook(name: str, run_dir: Path, params: dict, tag: str | None = None) -> Path:
    """Execute notebooks/<name> in run_dir with `params` as <stem>[_tag].ipynb there. What the cells
    print (training's progress bar and losses included) goes to this process's stdout and stderr
    as it happens, besides into the executed notebook."""
    import papermill
    from papermill.exceptions import PapermillExecutionError
    out = run_dir / f"{Path(name).stem}{'_' + tag if tag else ''}.ipynb"
    print(f"[pipeline] {out.name}: {json.dumps(params, default=str)[:200]}", flush=True)
    started = time.time()
    try:
        with text_progress():
            # stdout_file/stderr_file pass the streams through once each; log_output=True would also
            # send them to papermill's logger (stderr as warnings: printed twice)
            papermill.execute_notebook(str(NOTEBOOKS / name), str(out), parameters=params, cwd=str(run_dir),
                                       progress_bar=False, log_output=False, stdout_file=sys.stdout,
                                       stderr_file=sys.stderr)
    except PapermillExecutionError as e:
        raise NotebookFailed(f"{name} failed in cell {e.exec_count}: {e.ename}: {e.evalue} — see {out}") from None
    print(f"[pipeline] {out.name} done in {time.time() - started:.0f} s", flush=True)
    return out
