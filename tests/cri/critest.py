"""make critest: cri-tools' validation suite (critest) against the husk and runc handlers.

Starts the test harness's containerd (handlers `runc` and `husk`) with critest's
images (tests/cri/images.py) imported under the names critest uses, and their
own sandbox image, then runs critest once per handler, inside containerd's network
namespace (its streaming and port-forward specs dial 127.0.0.1). Keeps each
handler's ginkgo JSON report and output, and a summary, in build/critest/, and
prints passed/failed/skipped per handler with the failed specs. No registry is
reachable, so the specs that pull images are skipped.

Environment:
  CRITEST_DIR       the directory with the critest binary (default <repo>/../shared/tools/cri-tools)
  CRITEST_FOCUS     a ginkgo focus regex, for a quick run of a few specs
  CRITEST_SKIP      a ginkgo skip regex, on top of the specs that need a registry
  CRITEST_HANDLERS  the handlers to run, comma-separated, in that order (default runc,husk)
  CRITEST_ARGS      more critest arguments, as shell words (e.g. --ginkgo.v)

Exit status: 0 when critest ran to its end for every handler and nothing was
left behind, whatever the specs' results (they are in summary.json); 1
otherwise; 2 for bad settings. Without a critest binary it says so and exits 0.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tests.conftest import GUEST_DIR, GUEST_FILES, write_test_config
from tests.cri.harness import (HUSK_HANDLER, NETNS_DIR, RUNC_HANDLER, STANDARD_PATH, Containerd,
                               ContainerdOptions, HarnessError, LeakError, mounts_under, shared_tools_dir)
from tests.cri.images import ImageBuildError, build_critest_images

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CRITEST_DIR = shared_tools_dir() / "cri-tools"
DEFAULT_OUT_DIR = REPO_ROOT / "build" / "critest"
DEFAULT_HANDLERS = (RUNC_HANDLER, HUSK_HANDLER)
KNOWN_HANDLERS = frozenset(DEFAULT_HANDLERS)
# The specs that pull from a registry (none is reachable): by tag, without a tag and by
# digest, image status of all kinds of references and of images with users, and
# listing three freshly pulled images. Every other spec finds its image imported.
REGISTRY_SKIP = "Image Manager (public image with|public image without|image status|listImage)"
# The whole suite takes ~25 minutes under TCG; ginkgo's default (1h) is too tight for a slow machine.
SUITE_TIMEOUT = "3h"
# After Ctrl-C (which critest gets too), ginkgo runs the current spec's cleanup and writes its report.
INTERRUPT_GRACE_S = 90.0
OUTPUT_CHUNK = 65536
MESSAGE_CLIP = 2000
# Agent timeouts of the CRI tests' husk handler: several VMs booting under TCG take minutes.
HUSK_AGENT_SETTINGS: dict[str, object] = {"dial_timeout_s": 300.0, "request_timeout_s": 120.0}
# critest's pods get the cgroup parent /test.slice (containerd 1.6 has no RuntimeConfig RPC
# to tell critest it uses cgroupfs), and a container without one containerd's /k8s.io/<id>.
# Whatever of these a run creates and leaves empty is removed after it.
CRITEST_CGROUP_PARENTS = ("test.slice", "k8s.io")

# ginkgo's spec states (types.SpecState).
PASSED_STATES = frozenset({"passed"})
FAILED_STATES = frozenset({"failed", "panicked", "timedout", "aborted", "interrupted"})
SKIPPED_STATES = frozenset({"skipped", "pending"})
_SHM_ID = re.compile(r"^Shared memory id: (\d+)$", re.MULTILINE)


class CritestError(RuntimeError):
    """Bad settings, or a ginkgo report that cannot be read."""


# ----------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class Settings:
    critest: Path
    handlers: tuple[str, ...] = DEFAULT_HANDLERS
    focus: str | None = None
    skips: tuple[str, ...] = (REGISTRY_SKIP,)
    extra_args: tuple[str, ...] = ()
    out_dir: Path = DEFAULT_OUT_DIR


def settings_from_env(env: Mapping[str, str], repo: Path = REPO_ROOT) -> Settings:
    """Settings from CRITEST_* variables (see the module docstring); raises CritestError for bad ones."""
    critest_dir = (Path(env["CRITEST_DIR"]) if env.get("CRITEST_DIR")
                   else shared_tools_dir(repo) / "cri-tools")
    handlers = tuple(h.strip() for h in env.get("CRITEST_HANDLERS", ",".join(DEFAULT_HANDLERS)).split(",")
                     if h.strip())
    if not handlers:
        raise CritestError("CRITEST_HANDLERS names no handler")
    unknown = [h for h in handlers if h not in KNOWN_HANDLERS]
    if unknown:
        raise CritestError(f"CRITEST_HANDLERS: unknown handler(s) {', '.join(unknown)}; "
                           f"the harness has {', '.join(sorted(KNOWN_HANDLERS))}")
    if len(set(handlers)) != len(handlers):
        raise CritestError(f"CRITEST_HANDLERS names a handler twice: {','.join(handlers)}")
    skips = (REGISTRY_SKIP, env["CRITEST_SKIP"]) if env.get("CRITEST_SKIP") else (REGISTRY_SKIP,)
    try:
        extra = tuple(shlex.split(env.get("CRITEST_ARGS", "")))
    except ValueError as exc:
        raise CritestError(f"CRITEST_ARGS: {exc}") from None
    return Settings(critest=critest_dir / "critest", handlers=handlers, focus=env.get("CRITEST_FOCUS") or None,
                    skips=skips, extra_args=extra, out_dir=repo / "build" / "critest")


def critest_argv(settings: Settings, handler: str, address: str, report: Path) -> list[str]:
    """critest's command line for one handler of the containerd at `address`."""
    endpoint = f"unix://{address}"
    argv = [
        str(settings.critest),
        f"--runtime-endpoint={endpoint}",
        f"--image-endpoint={endpoint}",
        f"--runtime-handler={handler}",
        f"--ginkgo.timeout={SUITE_TIMEOUT}",
        "--ginkgo.no-color",
        f"--ginkgo.json-report={report}",
    ]
    argv += [f"--ginkgo.skip={skip}" for skip in settings.skips]
    if settings.focus:
        argv.append(f"--ginkgo.focus={settings.focus}")
    return argv + list(settings.extra_args)


# ----------------------------------------------------------------------------
# Reports


@dataclass(frozen=True)
class SpecOutcome:
    name: str
    state: str
    message: str = ""
    location: str = ""

    @property
    def headline(self) -> str:
        """The message on one line (gomega's start with a bare "Expected")."""
        return " ".join(self.message.split())


@dataclass(frozen=True)
class SuiteResult:
    """One ginkgo JSON report, reduced to what the summary needs."""

    passed: tuple[str, ...]
    failed: tuple[SpecOutcome, ...]
    # Specs that ran and skipped themselves (a feature the runtime does not announce).
    skipped: tuple[SpecOutcome, ...]
    # Specs left out by --ginkgo.focus/--ginkgo.skip (they count as skipped too).
    not_selected: int
    # Suite-level trouble: a failed BeforeSuite, the suite timeout, an interrupt.
    problems: tuple[str, ...]

    @property
    def skipped_total(self) -> int:
        return len(self.skipped) + self.not_selected

    def counts(self) -> dict[str, int]:
        return {"passed": len(self.passed), "failed": len(self.failed), "skipped": self.skipped_total}


def spec_name(spec: Mapping[str, object]) -> str:
    """ginkgo's full text: the container texts and the leaf text, space-separated."""
    texts = spec.get("ContainerHierarchyTexts") or []
    if not isinstance(texts, list):
        raise CritestError("ginkgo report: ContainerHierarchyTexts is not a list")
    return " ".join(str(t) for t in [*texts, spec.get("LeafNodeText", "")] if t)


def _failure(spec: Mapping[str, object]) -> tuple[str, str]:
    failure = spec.get("Failure")
    if not isinstance(failure, dict):
        return "", ""
    message = str(failure.get("Message", ""))[:MESSAGE_CLIP]
    where = failure.get("Location")
    location = f"{where.get('FileName', '')}:{where.get('LineNumber', '')}" if isinstance(where, dict) else ""
    return message, location


def parse_report(data: object) -> SuiteResult:
    """Reads the report `--ginkgo.json-report` writes: a list with one suite report."""
    if not isinstance(data, list) or len(data) != 1 or not isinstance(data[0], dict):
        raise CritestError("not a ginkgo JSON report (expected a list with one suite)")
    suite = data[0]
    specs = suite.get("SpecReports") or []
    if not isinstance(specs, list):
        raise CritestError("ginkgo report: SpecReports is not a list")
    passed: list[str] = []
    failed: list[SpecOutcome] = []
    skipped: list[SpecOutcome] = []
    not_selected = 0
    problems = [f"suite: {reason}" for reason in suite.get("SpecialSuiteFailureReasons") or []]
    for spec in specs:
        if not isinstance(spec, dict):
            raise CritestError("ginkgo report: a spec report is not an object")
        state = str(spec.get("State", ""))
        message, location = _failure(spec)
        if spec.get("LeafNodeType") != "It":
            if state in FAILED_STATES:  # BeforeSuite, AfterSuite, ReportAfterSuite, ...
                problems.append(f"{spec.get('LeafNodeType')} {state}: {message.strip()}".strip())
            continue
        name = spec_name(spec)
        if state in PASSED_STATES:
            passed.append(name)
        elif state in FAILED_STATES:
            failed.append(SpecOutcome(name, state, message, location))
        elif state in SKIPPED_STATES and not spec.get("NumAttempts") and not message:
            not_selected += 1
        elif state in SKIPPED_STATES:
            skipped.append(SpecOutcome(name, state, message, location))
        else:
            raise CritestError(f"ginkgo report: spec {name!r} has unknown state {state!r}")
    return SuiteResult(passed=tuple(passed), failed=tuple(failed), skipped=tuple(skipped), not_selected=not_selected,
                       problems=tuple(problems))


# ----------------------------------------------------------------------------
# Runs and the summary


@dataclass
class HandlerRun:
    """critest against one handler: where its report and output are, and how it went."""

    handler: str
    report: Path
    log: Path
    exit_code: int | None = None
    seconds: float = 0.0
    result: SuiteResult | None = None
    error: str | None = None
    leftovers: list[str] = field(default_factory=list)

    @classmethod
    def in_dir(cls, handler: str, out_dir: Path) -> HandlerRun:
        return cls(handler, report=out_dir / f"{handler}.json", log=out_dir / f"{handler}.log")

    @property
    def completed(self) -> bool:
        """critest ran to its end (whatever its specs did) and nothing was left behind."""
        return self.result is not None and not self.result.problems and self.error is None and not self.leftovers


def only_failing_with(runs: Sequence[HandlerRun], baseline: str = RUNC_HANDLER) -> dict[str, list[str]]:
    """Per handler, the specs that failed with it and passed with `baseline` in the same run."""
    base = next((r for r in runs if r.handler == baseline and r.result is not None), None)
    if base is None or base.result is None:
        return {}
    passed = set(base.result.passed)
    return {r.handler: [s.name for s in r.result.failed if s.name in passed]
            for r in runs if r.handler != baseline and r.result is not None}


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def format_run(run: HandlerRun) -> list[str]:
    """The lines printed for one handler: its counts, then each failed spec with its message on one line."""
    if run.result is None:
        return [f"{run.handler}: no result: {run.error}"]
    res = run.result
    skipped = f"{res.skipped_total} skipped"
    if res.not_selected:
        skipped += f" ({res.not_selected} not selected)"
    counts = f"{len(res.passed)} passed, {len(res.failed)} failed, {skipped}"
    lines = [f"{run.handler}: {counts} in {_duration(run.seconds)}"]
    for spec in res.failed:
        lines.append(f"  FAILED {spec.name}")
        if spec.headline:
            lines.append(f"         {spec.headline[:200]}")
    lines += [f"  PROBLEM {p}" for p in res.problems]
    if run.error:
        lines.append(f"  PROBLEM {run.error}")
    lines += [f"  LEFT BEHIND {x}" for x in run.leftovers]
    return lines


def _run_json(run: HandlerRun) -> dict[str, object]:
    out: dict[str, object] = {
        "report": str(run.report), "log": str(run.log), "exit_code": run.exit_code,
        "seconds": round(run.seconds, 1), "completed": run.completed, "error": run.error, "leftovers": run.leftovers,
    }
    if run.result is not None:
        res = run.result
        out.update(res.counts())
        out["not_selected"] = res.not_selected
        out["problems"] = list(res.problems)
        out["failed_specs"] = [asdict(s) for s in res.failed]
        out["skipped_specs"] = [{"name": s.name, "reason": s.headline} for s in res.skipped]
    return out


def summary(runs: Sequence[HandlerRun], settings: Settings, versions: Mapping[str, str],
            teardown: Sequence[str] = ()) -> dict[str, object]:
    """What summary.json holds: the settings, the versions, and per handler the counts and failed specs."""
    return {
        "versions": dict(versions),
        "focus": settings.focus,
        "skip": list(settings.skips),
        "extra_args": list(settings.extra_args),
        "handlers": {run.handler: _run_json(run) for run in runs},
        "only_failing_with": only_failing_with(runs),
        "teardown": list(teardown),
    }


def shm_ids(ipcmk_output: str) -> list[int]:
    """The segment ids in `ipcmk -M` output ("Shared memory id: N" lines)."""
    return [int(m) for m in _SHM_ID.findall(ipcmk_output)]


# ----------------------------------------------------------------------------
# Host side effects of critest itself


@dataclass(frozen=True)
class IpcRecorder:
    """An `ipcmk` first on critest's PATH that notes the ids of the segments it makes.

    The HostIpc specs make a shared memory segment on the host with ipcmk and
    never remove it; remove() does, and only those.
    """

    bin_dir: Path
    record: Path

    def install(self) -> None:
        real = shutil.which("ipcmk", path=STANDARD_PATH)
        self.bin_dir.mkdir(parents=True, exist_ok=True)
        if real is None:
            return  # the HostIpc specs fail on their own and say why
        wrapper = self.bin_dir / "ipcmk"
        wrapper.write_text(
            "#!/bin/sh\n"
            "# husk tests/cri/critest.py: notes the ids of the segments critest makes, to remove them later.\n"
            f"out=$({shlex.quote(real)} \"$@\") || exit\n"
            "printf '%s\\n' \"$out\"\n"
            f"printf '%s\\n' \"$out\" >> {shlex.quote(str(self.record))}\n"
        )
        wrapper.chmod(0o755)

    def remove(self) -> list[str]:
        """Removes the recorded segments; returns what could not be removed."""
        try:
            ids = shm_ids(self.record.read_text())
        except FileNotFoundError:
            return []
        failed: list[str] = []
        for shmid in ids:
            proc = subprocess.run(["ipcrm", "-m", str(shmid)], capture_output=True, text=True, check=False)
            if proc.returncode != 0 and "invalid id" not in proc.stderr:
                failed.append(f"shared memory segment {shmid}: {proc.stderr.strip()}")
        self.record.unlink()
        return failed


def _cgroup_roots() -> list[Path]:
    with open("/proc/self/mounts") as f:
        return [Path(line.split()[1]) for line in f if line.split()[2] in ("cgroup", "cgroup2")]


def critest_cgroups() -> set[Path]:
    """The cgroup parents critest's pods get (CRITEST_CGROUP_PARENTS), in every hierarchy, that exist now."""
    return {root / name for root in _cgroup_roots() for name in CRITEST_CGROUP_PARENTS if (root / name).is_dir()}


def remove_new_cgroups(before: set[Path]) -> list[str]:
    """Removes the critest cgroup parents that were not there `before` (deepest first, only empty
    ones: rmdir fails on a cgroup with tasks); returns those that remain."""
    remaining: list[str] = []
    for top in sorted(critest_cgroups() - before):
        for d in sorted((Path(p) for p, _, _ in os.walk(top)), key=lambda p: len(p.parts), reverse=True):
            try:
                d.rmdir()
            except OSError as exc:
                remaining.append(f"cgroup {d}: {exc.strerror}")
    return remaining


def _lazy_unmount(path: str) -> None:
    subprocess.run(["umount", "--lazy", path], capture_output=True, check=False)


def clean_scratch(scratch: Path) -> list[str]:
    """Removes critest's TMPDIR (host paths and pod log dirs); mounts left in it are unmounted and reported."""
    left = mounts_under(scratch)
    for mount_point in left:
        _lazy_unmount(mount_point)
    still = mounts_under(scratch)
    if not still:
        shutil.rmtree(scratch, ignore_errors=True)
    return [f"mount {m}" for m in left] + [f"not removing {scratch}: still mounted: {m}" for m in still]


# ----------------------------------------------------------------------------
# Running critest


def run_teed(argv: Sequence[str], *, env: Mapping[str, str], cwd: Path, log_path: Path) -> int:
    """Runs argv with its output copied, as it comes, to our stdout and to log_path."""
    with open(log_path, "wb") as log_file:
        # Unbuffered: each read returns what is there, so ginkgo's progress dots show as they come.
        proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, env=dict(env), cwd=cwd, bufsize=0)
        assert proc.stdout is not None
        try:
            while chunk := proc.stdout.read(OUTPUT_CHUNK):
                sys.stdout.buffer.write(chunk)
                sys.stdout.buffer.flush()
                log_file.write(chunk)
            return proc.wait()
        except KeyboardInterrupt:
            # critest got the same SIGINT (one process group): let ginkgo clean up and write its report.
            print(f"\ninterrupted: waiting up to {INTERRUPT_GRACE_S:.0f}s for critest to clean up", flush=True)
            with contextlib.suppress(subprocess.TimeoutExpired):
                rest, _ = proc.communicate(timeout=INTERRUPT_GRACE_S)
                sys.stdout.buffer.write(rest or b"")
                sys.stdout.buffer.flush()
                log_file.write(rest or b"")
            raise
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()


def _read_report(run: HandlerRun) -> None:
    """Fills run.result from the report (ginkgo writes one when interrupted too), else run.error."""
    if not run.report.exists():
        run.error = run.error or f"critest exited {run.exit_code} without writing {run.report}; see {run.log}"
        return
    try:
        run.result = parse_report(json.loads(run.report.read_text()))
    except (OSError, ValueError, CritestError) as exc:
        run.error = run.error or f"cannot read {run.report}: {exc}"


def _clean_up_after(cd: Containerd, scratch: Path, ipc: IpcRecorder, cgroups_before: set[Path]) -> list[str]:
    """What critest and the runtime left behind, removed; returns what should not have been there."""
    found: list[str] = []
    try:
        cd.assert_no_leaks()  # pods, containers, shims, mounts, cgroup tasks; resets the instance if any
    except LeakError as exc:
        found.append(str(exc))
    found += ipc.remove()
    found += remove_new_cgroups(cgroups_before)
    found += clean_scratch(scratch)
    return found


def run_handler(cd: Containerd, settings: Settings, run: HandlerRun, work: Path) -> None:
    """critest against run.handler, then the cleanup of what it left, then its report (also after Ctrl-C)."""
    for stale in (run.report, run.log):
        stale.unlink(missing_ok=True)
    scratch = work / f"tmp-{run.handler}"
    scratch.mkdir()
    ipc = IpcRecorder(work / "bin", work / f"ipc-{run.handler}.txt")
    ipc.install()
    cgroups_before = critest_cgroups()
    argv = ["nsenter", f"--net={NETNS_DIR / cd.netns}", "--",
            *critest_argv(settings, run.handler, cd.address, run.report)]
    env = {"PATH": f"{ipc.bin_dir}:{STANDARD_PATH}", "HOME": "/root", "TMPDIR": str(scratch)}
    print(f"\n== critest with runtime handler {run.handler!r} (output also in {run.log})", flush=True)
    log.info("running %s", shlex.join(argv))
    started = time.monotonic()
    try:
        run.exit_code = run_teed(argv, env=env, cwd=scratch, log_path=run.log)
    except KeyboardInterrupt:
        run.error = "interrupted"
        raise
    finally:
        run.seconds = time.monotonic() - started
        run.leftovers = _clean_up_after(cd, scratch, ipc, cgroups_before)
        _read_report(run)


def critest_version(critest: Path) -> str:
    proc = subprocess.run([str(critest), "--version"], capture_output=True, text=True, timeout=60, check=False)
    # "critest version: v1.31.1" (then go test's "PASS")
    first = proc.stdout.strip().splitlines()[0] if proc.stdout.strip() else ""
    return first.rsplit(" ", 1)[-1] if proc.returncode == 0 and first else f"unknown (exit {proc.returncode})"


def _keep_containerd_log(cd: Containerd, keep_dir: Path, dest: Path) -> None:
    """The harness keeps containerd.log as <keep_dir>/<instance>.log; give it a stable name."""
    if cd.last_record is None:
        return
    kept = keep_dir / f"{Path(cd.last_record.root).name}.log"
    if kept.exists():
        os.replace(kept, dest)
    with contextlib.suppress(OSError):
        keep_dir.rmdir()


def _print_results(runs: Sequence[HandlerRun], versions: Mapping[str, str], settings: Settings,
                   teardown: Sequence[str]) -> None:
    print(f"\ncritest {versions.get('critest', '?')} on {versions.get('containerd', '?')}; "
          f"reports, output and summary.json in {settings.out_dir}")
    for run in runs:
        print("\n".join(format_run(run)))
    for handler, names in only_failing_with(runs).items():
        print(f"failing with {handler} only (passing with {RUNC_HANDLER}): {len(names)}")
    for problem in teardown:
        print(f"teardown: {problem}")


def run_all(settings: Settings, work: Path, state: Path, runs: list[HandlerRun],
            versions: dict[str, str]) -> list[str]:
    """Builds the images, starts containerd, runs critest per handler (appending to `runs`) and
    tears containerd down; returns what the teardown had to force or could not remove."""
    print("building critest's images from Debian packages...", flush=True)
    images = build_critest_images()  # with their own sandbox image, under the harness's pause name
    config = write_test_config(work / "husk.toml", state, agent=HUSK_AGENT_SETTINGS)
    keep_dir = settings.out_dir / "containerd-logs"
    cd = Containerd(ContainerdOptions(images=images, husk_config=config, keep_logs_dir=keep_dir))
    try:
        with cd:  # stops containerd and tears everything down, also after an error or Ctrl-C
            version = cd.cri.version()
            versions["containerd"] = f"{version.runtime_name} {version.runtime_version}"
            print(f"containerd is up ({cd.address}, netns {cd.netns}); handlers: {', '.join(settings.handlers)}",
                  flush=True)
            for handler in settings.handlers:
                runs.append(HandlerRun.in_dir(handler, settings.out_dir))
                run_handler(cd, settings, runs[-1], work)
    except LeakError as exc:  # the teardown had to force something, or something survived it
        return [str(exc)]
    finally:
        _keep_containerd_log(cd, keep_dir, settings.out_dir / "containerd.log")
    return []


def _remove_dirs(*dirs: Path) -> list[str]:
    """rmtree, but never of a directory with something still mounted below it."""
    problems: list[str] = []
    for d in dirs:
        left = mounts_under(d)
        if left:
            problems.append(f"not removing {d}: still mounted: {', '.join(left)}")
        else:
            shutil.rmtree(d, ignore_errors=True)
    return problems


def _preflight(settings: Settings) -> str | None:
    """Why critest cannot run against settings.handlers, if it cannot."""
    missing = [f for f in GUEST_FILES if not (GUEST_DIR / f).exists()]
    if HUSK_HANDLER in settings.handlers and missing:
        return f"guest image incomplete ({', '.join(missing)} missing in {GUEST_DIR}): run `make guest-image`"
    return None


def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        settings = settings_from_env(os.environ)
    except CritestError as exc:
        print(f"critest: {exc}", file=sys.stderr)
        return 2
    if not os.access(settings.critest, os.X_OK):
        print(f"critest: {settings.critest} not found: skipping the CRI validation suite "
              "(set CRITEST_DIR to the directory of a cri-tools critest binary)")
        return 0
    problem = _preflight(settings)
    if problem:
        print(f"critest: {problem}", file=sys.stderr)
        return 1
    settings.out_dir.mkdir(parents=True, exist_ok=True)
    versions = {"critest": critest_version(settings.critest)}
    runs: list[HandlerRun] = []
    teardown: list[str] = []
    interrupted = False
    work = Path(tempfile.mkdtemp(prefix="husk-critest-"))
    state = Path("/run") / f"husk-critest-{secrets.token_hex(3)}"
    try:
        teardown += run_all(settings, work, state, runs, versions)
    except (ImageBuildError, HarnessError) as exc:
        teardown.append(f"could not run critest: {exc}")
    except KeyboardInterrupt:
        interrupted = True
    finally:
        teardown += _remove_dirs(work, state)
        (settings.out_dir / "summary.json").write_text(
            json.dumps(summary(runs, settings, versions, teardown), indent=1) + "\n")
    _print_results(runs, versions, settings, teardown)
    if interrupted:
        print("critest: interrupted")
        return 130
    ok = len(runs) == len(settings.handlers) and all(r.completed for r in runs) and not teardown
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
