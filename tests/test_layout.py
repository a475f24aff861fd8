"""The layout's rules (README "Development"): the import contracts hold and catch a forbidden
import; the CLI loads a command's heavy dependencies only when that command runs."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from worker.producer import Producer
from worker.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = str(Path(sys.executable).with_name("lint-imports"))
ROOMS = "Rooms: the core imports no surface, sandbox or tool; tools never import the cli"
SANDBOX = "Sandbox: an independent check of the client, it imports nothing else of the"
ACYCLIC = "No import cycles between the modules of any package"


def lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` on the package in ``tree`` (its own pyproject, its own copy of worker/)."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run([LINT_IMPORTS, "--no-cache"], cwd=tree, env=env, capture_output=True,
                          text=True, timeout=120)


def test_the_tree_keeps_every_contract() -> None:
    done = lint_imports(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    for name in (ROOMS, SANDBOX, ACYCLIC):
        assert f"{name}" in done.stdout


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    """The package and its pyproject copied to a tmp dir, to break on purpose."""
    shutil.copytree(ROOT / "worker", tmp_path / "worker",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def add_line(module: Path, line: str) -> None:
    module.write_text(module.read_text() + f"\n{line}  # noqa\n")


@pytest.mark.parametrize(("module", "line", "contract", "verdict"), [
    ("store.py", "import worker.serve.app", ROOMS,
     "worker.store is not allowed to import worker.serve"),
    ("tools/demo.py", "from worker.cli import main", ROOMS,
     "worker.tools is not allowed to import worker.cli"),
    ("sandbox/state.py", "from worker import store", SANDBOX,
     "worker.sandbox is not allowed to import worker.store"),
    ("celery_app.py", "from worker import tasks", ACYCLIC, "No cycles are allowed in worker."),
])
def test_a_forbidden_import_breaks_its_contract(copy: Path, module: str, line: str,
                                                contract: str, verdict: str) -> None:
    # the copy is the real tree, which keeps every contract (test above): only the line breaks it
    add_line(copy / "worker" / module, line)
    done = lint_imports(copy)
    assert done.returncode != 0
    broken = done.stdout.split("Broken contracts", 1)[1]
    assert contract.split(":")[0] in broken and verdict in broken, done.stdout


def test_a_new_module_must_be_placed_in_a_room(copy: Path) -> None:
    (copy / "worker" / "newcomer.py").write_text('"""Not yet in the contract."""\n')
    done = lint_imports(copy)
    assert done.returncode != 0
    assert "worker.newcomer" in done.stdout + done.stderr


#: what a command that only reads Redis has no use for
HEAVY = ("starlette", "uvicorn", "rich", "celery", "kombu", "prometheus_client",
         "worker.tools", "worker.sandbox", "worker.serve", "worker.monitor")

PROBE = """
import json, sys
from worker.cli import main
try:
    main(sys.argv[1:], prog_name="tpns-batcher")
except SystemExit as exc:
    code = exc.code
heavy = sorted(m for m in sys.modules if m.split(".")[0] in {h.split(".")[0] for h in HEAVY}
               and any(m == h or m.startswith(h + ".") for h in HEAVY))
print(json.dumps({"code": code, "heavy": heavy}), file=sys.stderr)
"""


def probe(args: list[str], **env: str) -> dict[str, object]:
    """Run the CLI with ``args`` in a fresh interpreter; the heavy modules it ended up with."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("TPNS_", "REDIS_", "CELERY_"))}
    done = subprocess.run([sys.executable, "-c", f"HEAVY = {HEAVY!r}\n{PROBE}", *args],
                          env={**clean, **env}, capture_output=True, text=True, timeout=60)
    report: dict[str, object] = json.loads(done.stderr.strip().splitlines()[-1])
    report["stdout"] = done.stdout
    return report


def test_status_loads_no_heavy_module(redis_url: str, prefix: str) -> None:
    settings = Settings.from_env({"REDIS_URL": redis_url, "TPNS_REDIS_PREFIX": prefix})
    producer = Producer(redis_url, prefix, settings=settings, wake=lambda wakes: None)
    intent_id = producer.submit({"operator_type": 4, "token": "tok-layout"})
    producer.close()
    env = {"REDIS_URL": redis_url, "TPNS_REDIS_PREFIX": prefix}

    helped = probe(["status", "--help"], **env)
    assert helped["code"] == 0 and "Usage: tpns-batcher status" in str(helped["stdout"])
    assert helped["heavy"] == []

    looked_up = probe(["status", intent_id], **env)
    assert looked_up["code"] is None or looked_up["code"] == 0
    assert json.loads(str(looked_up["stdout"]))["id"] == intent_id
    assert looked_up["heavy"] == []


def test_the_probe_sees_a_command_that_needs_them() -> None:
    served = probe(["serve", "--help"])
    assert served["code"] == 0
    assert {"starlette", "worker.serve"} <= set(served["heavy"])  # type: ignore[arg-type]


MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
#: units over the limits, each with the reason it stays (path, or path:function)
ALLOWED: dict[str, str] = {}


def oversized(root: Path) -> dict[str, int]:
    """Modules over MAX_MODULE_LINES and functions over MAX_FUNCTION_LINES (from ``def`` to the
    last line, nested functions included) -> their length."""
    found: dict[str, int] = {}
    for path in sorted((root / "worker").rglob("*.py")):
        text = path.read_text()
        name = path.relative_to(root).as_posix()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            found[name] = len(text.splitlines())
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    found[f"{name}:{node.name}"] = length
    return found


def test_no_module_or_function_over_the_limits_without_a_reason() -> None:
    unexplained = {unit: n for unit, n in oversized(ROOT).items() if unit not in ALLOWED}
    assert unexplained == {}, "split these, or add them to ALLOWED with a reason"


def test_the_size_check_sees_a_long_function(copy: Path) -> None:
    body = "".join(f"    x{k} = {k}\n" for k in range(MAX_FUNCTION_LINES))
    (copy / "worker" / "errors.py").write_text(
        (copy / "worker" / "errors.py").read_text() + f"\n\ndef too_long() -> None:\n{body}")
    assert oversized(copy)["worker/errors.py:too_long"] == MAX_FUNCTION_LINES + 1
