"""make critest's pure parts: settings, critest's command line, ginkgo reports, the summary,
and the pieces of critest's images that need no .deb or compiler."""
from __future__ import annotations

import io
import json
import subprocess
import tarfile
from pathlib import Path

import pytest

from tests.cri.critest import (REGISTRY_SKIP, SUITE_TIMEOUT, CritestError, HandlerRun, Settings,
                               SpecOutcome, critest_argv, format_run, only_failing_with, parse_report,
                               settings_from_env, shm_ids, spec_name, summary)
from tests.cri.images import (CRITEST_HOSTNET_NGINX_REF, CRITEST_IMAGES, PGREP_SH, _Entry,
                              deterministic_tar)

REPO = Path("/repo")


def _spec(text: str, state: str, *, containers: tuple[str, ...] = ("[k8s.io] Suite", "ctx"), attempts: int = 1,
          failure: dict[str, object] | None = None, node: str = "It") -> dict[str, object]:
    spec: dict[str, object] = {
        "ContainerHierarchyTexts": list(containers), "LeafNodeType": node, "LeafNodeText": text,
        "State": state, "NumAttempts": attempts,
    }
    if failure is not None:
        spec["Failure"] = failure
    return spec


def _report(*specs: dict[str, object], reasons: list[str] | None = None) -> list[dict[str, object]]:
    return [{"SuiteDescription": "CRI validation", "SuiteSucceeded": False,
             "SpecialSuiteFailureReasons": reasons, "SpecReports": list(specs)}]


def _failure(message: str, line: int = 42) -> dict[str, object]:
    return {"Message": message, "Location": {"FileName": "sigs.k8s.io/cri-tools/pkg/validate/x.go", "LineNumber": line}}


# -- reports -------------------------------------------------------------------


def test_report_counts_passed_failed_skipped_and_not_selected() -> None:
    result = parse_report(_report(
        _spec("", "passed", containers=(), node="BeforeSuite", attempts=0),
        _spec("passes", "passed"),
        _spec("fails", "failed", failure=_failure("Expected\n    <string>: 6\nto be empty")),
        _spec("times out", "timedout", failure=_failure("A spec timeout occurred")),
        _spec("skips itself", "skipped", failure=_failure("The runtime does not support X")),
        _spec("filtered out", "skipped", attempts=0),
        _spec("also filtered out", "skipped", attempts=0),
    ))
    assert result.passed == ("[k8s.io] Suite ctx passes",)
    assert [s.name for s in result.failed] == ["[k8s.io] Suite ctx fails", "[k8s.io] Suite ctx times out"]
    assert result.failed[0].location == "sigs.k8s.io/cri-tools/pkg/validate/x.go:42"
    assert result.failed[0].headline == "Expected <string>: 6 to be empty"
    assert [s.headline for s in result.skipped] == ["The runtime does not support X"]
    assert result.not_selected == 2
    assert result.counts() == {"passed": 1, "failed": 2, "skipped": 3}
    assert result.problems == ()


def test_suite_level_failures_are_problems_not_specs() -> None:
    result = parse_report(_report(
        _spec("", "failed", containers=(), node="BeforeSuite", failure=_failure("cannot connect to the runtime")),
        _spec("never ran", "skipped", attempts=0),
        reasons=["Suite Timeout Elapsed"],
    ))
    assert result.problems == ("suite: Suite Timeout Elapsed", "BeforeSuite failed: cannot connect to the runtime")
    assert result.counts() == {"passed": 0, "failed": 0, "skipped": 1}


@pytest.mark.parametrize("data", [{}, [], [{}, {}], ["x"], [{"SpecReports": "x"}], [{"SpecReports": ["x"]}]])
def test_what_is_not_a_ginkgo_report_is_refused(data: object) -> None:
    with pytest.raises(CritestError):
        parse_report(data)


def test_an_unknown_state_is_refused() -> None:
    with pytest.raises(CritestError, match="unknown state 'flaky'"):
        parse_report(_report(_spec("odd", "flaky")))


def test_spec_name_is_ginkgos_full_text() -> None:
    assert spec_name(_spec("leaf", "passed", containers=("[k8s.io] A", "", "b"))) == "[k8s.io] A b leaf"
    assert spec_name({"LeafNodeText": "alone"}) == "alone"


# -- runs and the summary -------------------------------------------------------


def _run(handler: str, passed: tuple[str, ...] = (), failed: tuple[str, ...] = (), **kw: object) -> HandlerRun:
    specs = [_spec(n, "passed", containers=()) for n in passed]
    specs += [_spec(n, "failed", containers=(), failure=_failure(f"{n} broke")) for n in failed]
    run = HandlerRun(handler, report=Path(f"/out/{handler}.json"), log=Path(f"/out/{handler}.log"), exit_code=1,
                     seconds=125.0, result=parse_report(_report(*specs)))
    for key, value in kw.items():
        setattr(run, key, value)
    return run


def test_only_failing_with_compares_against_runc_of_the_same_run() -> None:
    runc = _run("runc", passed=("a", "b"), failed=("c",))
    husk = _run("husk", passed=("a",), failed=("b", "c", "d"))
    assert only_failing_with([runc, husk]) == {"husk": ["b"]}
    assert only_failing_with([husk]) == {}


def test_format_run_lists_each_failed_spec_with_its_message() -> None:
    lines = format_run(_run("husk", passed=("a",), failed=("b",)))
    assert lines == ["husk: 1 passed, 1 failed, 0 skipped in 2m05s", "  FAILED b", "         b broke"]
    broken = HandlerRun("husk", Path("/r.json"), Path("/r.log"), error="critest exited 2 without writing /r.json")
    assert format_run(broken) == ["husk: no result: critest exited 2 without writing /r.json"]


def test_completed_means_a_report_and_nothing_left_behind() -> None:
    assert _run("runc", failed=("x",)).completed
    assert not _run("runc", leftovers=["mount /tmp/x"]).completed
    assert not HandlerRun("runc", Path("/r.json"), Path("/r.log")).completed


def test_summary_is_json_with_counts_and_failed_specs() -> None:
    settings = Settings(critest=Path("/t/critest"), focus="MaskedPaths")
    runs = [_run("runc", passed=("a", "b")), _run("husk", passed=("a",), failed=("b",))]
    data = json.loads(json.dumps(summary(runs, settings, {"critest": "v1.31.1"}, teardown=["x"])))
    assert data["focus"] == "MaskedPaths" and data["skip"] == [REGISTRY_SKIP]
    husk = data["handlers"]["husk"]
    assert (husk["passed"], husk["failed"], husk["skipped"], husk["completed"]) == (1, 1, 0, True)
    assert husk["failed_specs"] == [{"name": "b", "state": "failed", "message": "b broke",
                                     "location": "sigs.k8s.io/cri-tools/pkg/validate/x.go:42"}]
    assert data["only_failing_with"] == {"husk": ["b"]}
    assert data["teardown"] == ["x"]


def test_headline_of_an_empty_message() -> None:
    assert SpecOutcome("n", "failed").headline == ""


# -- settings and the command line ------------------------------------------------


def test_settings_defaults_find_critest_next_to_the_repo() -> None:
    s = settings_from_env({}, repo=REPO)
    assert s.critest == Path("/shared/tools/cri-tools/critest")
    assert s.handlers == ("runc", "husk")
    assert (s.focus, s.skips, s.extra_args) == (None, (REGISTRY_SKIP,), ())
    assert s.out_dir == REPO / "build" / "critest"


def test_settings_from_the_environment() -> None:
    s = settings_from_env({"CRITEST_DIR": "/opt/cri", "CRITEST_FOCUS": "MaskedPaths", "CRITEST_SKIP": "HostIpc",
                           "CRITEST_HANDLERS": " husk ", "CRITEST_ARGS": "--ginkgo.v '--ginkgo.label-filter=a b'"},
                          repo=REPO)
    assert s.critest == Path("/opt/cri/critest")
    assert (s.focus, s.skips, s.handlers) == ("MaskedPaths", (REGISTRY_SKIP, "HostIpc"), ("husk",))
    assert s.extra_args == ("--ginkgo.v", "--ginkgo.label-filter=a b")


@pytest.mark.parametrize(("env", "message"), [
    ({"CRITEST_HANDLERS": "kata"}, "unknown handler"),
    ({"CRITEST_HANDLERS": ","}, "no handler"),
    ({"CRITEST_HANDLERS": "runc,runc"}, "twice"),
    ({"CRITEST_ARGS": "'unclosed"}, "CRITEST_ARGS"),
])
def test_bad_settings_are_refused(env: dict[str, str], message: str) -> None:
    with pytest.raises(CritestError, match=message):
        settings_from_env(env, repo=REPO)


def test_critest_argv_targets_the_handler_and_keeps_the_report() -> None:
    s = Settings(critest=Path("/t/critest"), focus="MaskedPaths", skips=(REGISTRY_SKIP, "HostIpc"),
                 extra_args=("--ginkgo.v",))
    argv = critest_argv(s, "husk", "/tmp/husk-cri-1/containerd.sock", Path("/out/husk.json"))
    assert argv[0] == "/t/critest"
    assert "--runtime-endpoint=unix:///tmp/husk-cri-1/containerd.sock" in argv
    assert "--image-endpoint=unix:///tmp/husk-cri-1/containerd.sock" in argv
    assert "--runtime-handler=husk" in argv
    assert f"--ginkgo.timeout={SUITE_TIMEOUT}" in argv
    assert "--ginkgo.json-report=/out/husk.json" in argv
    assert [a for a in argv if a.startswith("--ginkgo.skip=")] == [f"--ginkgo.skip={REGISTRY_SKIP}",
                                                                   "--ginkgo.skip=HostIpc"]
    assert argv[-2:] == ["--ginkgo.focus=MaskedPaths", "--ginkgo.v"]
    assert not any(a.startswith("--ginkgo.focus") for a in critest_argv(Settings(Path("/c")), "runc", "/s", Path("/r")))


def test_shm_ids_reads_ipcmk_output() -> None:
    assert shm_ids("Shared memory id: 32769\nShared memory id: 5\nnoise\n") == [32769, 5]
    assert shm_ids("") == []


# -- critest's images ---------------------------------------------------------------


def test_hard_links_follow_the_file_they_name() -> None:
    entries = {
        "bin/ash": _Entry(tarfile.LNKTYPE, 0o755, linkname="bin/busybox"),
        "bin/busybox": _Entry(tarfile.REGTYPE, 0o755, b"\x7fELF"),
        "bin": _Entry(tarfile.DIRTYPE, 0o755),
        "usr/local/bin/nnp": _Entry(tarfile.REGTYPE, 0o4755, b"x"),
    }
    with tarfile.open(fileobj=io.BytesIO(deterministic_tar(entries))) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == ["bin", "bin/busybox", "usr/local/bin/nnp", "bin/ash"]
    assert members[-1].islnk() and members[-1].linkname == "bin/busybox"
    assert members[2].mode == 0o4755


def test_image_configs_carry_what_critest_relies_on() -> None:
    by_ref = {img.ref: img for img in CRITEST_IMAGES}
    hostnet = by_ref[CRITEST_HOSTNET_NGINX_REF].image_config()
    assert hostnet["Cmd"] == ["nginx", "-g", "daemon off;"]
    assert "NGINX_PORT=12003" in hostnet["Env"]  # type: ignore[operator]
    assert hostnet["StopSignal"] == "SIGQUIT"
    assert hostnet["ExposedPorts"] == {"12003/tcp": {}}
    for img in CRITEST_IMAGES:
        assert "/" not in img.file_stem and ":" not in img.file_stem


def test_pgrep_stand_in_prints_matching_pids_only() -> None:
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        found = subprocess.run(["sh", "-c", PGREP_SH, "pgrep", "sleep"], capture_output=True, text=True, timeout=30)
        assert str(sleeper.pid) in found.stdout.split()
        assert (found.returncode, found.stderr) == (0, "")
        none = subprocess.run(["sh", "-c", PGREP_SH, "pgrep", "no-such-process"], capture_output=True, text=True,
                              timeout=30)
        assert (none.returncode, none.stdout, none.stderr) == (1, "", "")
    finally:
        sleeper.kill()
        sleeper.wait()
