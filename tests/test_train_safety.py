"""The trainer's output directory, signals and configs made safe (issue 23): one run per directory
(an advisory lock naming the holder's pid), SIGTERM/SIGINT that finish the step, save and exit with
the shell's status, a resume to the same losses as an uninterrupted run, a `latest` link that is
refused, a killed run's leftovers removed, a thread default that ignores the load, a summary that
says what this process trained, a read-only output directory, YAML aliases, all unknown keys at once,
and a --help that describes every option. Real subprocesses and real signals where it is about
processes; a real read-only mount (root only) where it is about the disk."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from fastclip.train import checkpoint as ckpt
from fastclip.train import rundir
from fastclip.train.config import Config, ConfigError, load_config

MODEL = json.dumps({"patch_size": 8, "vision_depth": 1, "text_depth": 1})
# a tiny run long enough to be signalled mid-way (~40 ms a step at batch 16, one thread)
STEPS = 60
RUN = ["--train.steps", str(STEPS), "--train.batch_size", "16", "--model.overrides", MODEL]
RUN += ["--eval.every", "0", "--data.eval_size", "32", "--log.every", "1"]
RUN += ["--log.progress", "false", "--log.plot", "false", "--checkpoint.export", "false"]


def _env():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _cmd(out, *extra, threads=True):
    return [sys.executable, "-m", "fastclip.cli", "train", "--output-dir", out, *RUN, *extra] + (
        ["--train.threads", "1"] if threads else []
    )


def _run(cmd, timeout=180, **kw):
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout, **kw)


def _start(cmd, **kw):
    return subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _rows(out):
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        lines = f.read().splitlines()
    return [json.loads(x) for x in lines if x.endswith("}")]


def _losses(out):
    return {r["step"]: r["loss"] for r in _rows(out) if "loss" in r}


def _wait_for_step(proc, out, step, timeout=120):
    """Until the run has logged ``step`` (it is then training, past its set-up)."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        assert proc.poll() is None, (
            "the run ended before it could be signalled: " + proc.communicate()[1][-3000:]
        )
        if any(r["step"] >= step for r in _rows(out)):
            return
        time.sleep(0.05)
    raise AssertionError(f"no step {step} within {timeout} s")


def _lines(text, prefix="fastclip train:"):
    return [x for x in text.splitlines() if x.startswith(prefix)]


# ---- a second run, SIGTERM, resume to the same losses ----------------------------------------------


@pytest.mark.slow
def test_sigterm_saves_and_the_same_command_resumes_to_the_same_losses(tmp_path):
    ref, out = str(tmp_path / "ref"), str(tmp_path / "run")
    p = _run(_cmd(ref))
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    assert f"trained tiny for {STEPS} steps in " in p.stdout
    reference = _losses(ref)
    assert sorted(reference) == list(range(1, STEPS + 1))

    proc = _start(_cmd(out))
    try:
        _wait_for_step(proc, out, 3)
        # SIGTERM: the step finishes, a checkpoint is written, one line, status 143
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    (line,) = _lines(stderr)
    m = re.fullmatch(
        r"fastclip train: stopped by SIGTERM after step (\d+); checkpoint saved: (\S+); "
        r"run the same command to resume",
        line,
    )
    assert m, line
    stopped = int(m.group(1))
    assert 3 <= stopped < STEPS
    root = os.path.join(out, "checkpoints")
    assert m.group(2) == os.path.join(root, ckpt.step_name(stopped))
    assert ckpt.find_latest(root) == m.group(2) and ckpt.verify(m.group(2))["step"] == stopped
    assert open(os.path.join(out, rundir.LOCK)).read() == "", "a clean exit empties the lock file"
    # a killed save's marker left behind: removed on the next start
    open(os.path.join(root, "latest.tmp424242"), "w").write("step_000")

    # the same command again resumes (nothing moved aside) and reaches the uninterrupted losses
    p = _run(_cmd(out))
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    assert f"resumed from {m.group(2)} at step {stopped}" in p.stderr
    assert "removed what an interrupted run left: checkpoints/latest.tmp424242" in p.stderr
    assert not os.path.exists(os.path.join(root, "latest.tmp424242"))
    assert not [n for n in os.listdir(out) if n.startswith("previous-")]
    n = STEPS - stopped
    assert f"trained tiny steps {stopped + 1}-{STEPS} ({n} steps, resumed at step {stopped}) in " in p.stdout
    resumed = _losses(out)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step, loss in reference.items():
        assert abs(resumed[step] - loss) <= 1e-6 * max(1.0, abs(loss)), (step, resumed[step], loss)


@pytest.mark.slow
def test_sigint_saves_with_status_130_and_records_the_thread_default(tmp_path):
    """Ctrl-C (SIGINT) as a terminal sends it; no train.threads option: the default (the cores the
    process may use, here one by its affinity mask) is written to config.yaml."""
    out = str(tmp_path / "run")
    proc = _start(
        _cmd(out, threads=False), preexec_fn=lambda: os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    )
    try:
        _wait_for_step(proc, out, 2)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    (line,) = _lines(stderr)
    assert line.startswith("fastclip train: stopped by SIGINT after step ") and "checkpoint saved" in line
    step = int(line.split("after step ")[1].split(";")[0])
    assert ckpt.verify(ckpt.find_latest(os.path.join(out, "checkpoints")))["step"] == step
    import yaml

    with open(os.path.join(out, "config.yaml")) as f:
        assert yaml.safe_load(f)["train"]["threads"] == 1
    assert ckpt.verify(ckpt.find_latest(os.path.join(out, "checkpoints")))["config"]["train"]["threads"] == 1


@pytest.mark.slow
def test_a_second_run_is_refused_and_a_second_signal_exits_at_once(tmp_path):
    """A step that never ends (the test hook hangs step 3, as a stuck collective would): a second
    trainer on the directory is refused; the first SIGTERM waits for the step, the second leaves at
    once with status 143 and no checkpoint."""
    out = str(tmp_path / "run")
    proc = subprocess.Popen(
        _cmd(out), env={**_env(), "FASTCLIP_TEST_HANG": "3:0"},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        _wait_for_step(proc, out, 2)
        # the run is held at step 3: a second trainer on the same directory refuses in one line naming
        # the holder's pid, before moving anything aside
        before = sorted(os.listdir(out))
        second = _run(_cmd(out, "--checkpoint.resume", "never"), timeout=120)
        assert second.returncode == 2, (second.stdout + second.stderr)[-3000:]
        (line,) = _lines(second.stderr)
        assert f"is in use by another fastclip run (pid {proc.pid})" in line, line
        assert "Traceback" not in second.stderr
        assert not [n for n in os.listdir(out) if n.startswith("previous-")], "nothing was moved aside"
        assert sorted(os.listdir(out)) == before
        proc.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        assert proc.poll() is None, "the first signal waits for the step to end"
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, stderr[-3000:]
    assert "fastclip: second SIGTERM: exiting now, no checkpoint" in stderr
    assert not os.path.lexists(os.path.join(out, "checkpoints", "latest")), "no checkpoint on a second signal"


def _worker_pid(agent_pid: int, rank: int, timeout=60) -> int:
    """The pid of the torchrun worker with RANK=rank (a child of the agent), from /proc."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            kids = open(f"/proc/{agent_pid}/task/{agent_pid}/children").read().split()
        except OSError:
            kids = []
        for kid in kids:
            try:
                env = open(f"/proc/{kid}/environ", "rb").read().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in env:
                return int(kid)
        time.sleep(0.1)
    raise AssertionError(f"no worker with RANK={rank} under pid {agent_pid}")


def _torchrun(out, *extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    return cmd + ["-m", "fastclip.cli", "train", "--output-dir", out, *RUN, "--train.threads", "1", *extra]


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGTERM to rank 1", "SIGINT to the process group"])
def test_two_ranks_stop_after_the_same_step(tmp_path, how):
    """SIGTERM to rank 1 alone (rank 0 writes the manifest and `latest`): both ranks stop after the
    same step through the per-step agreement. Ctrl-C in a terminal (SIGINT to torchrun and every
    worker, which torchrun forwards again): one request, a checkpoint, not an immediate exit."""
    if not os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children"):
        pytest.skip("this kernel has no /proc/PID/task/PID/children to find the worker's pid")
    out = str(tmp_path / "run")
    proc = _start(_torchrun(out), start_new_session=True)
    sig = signal.SIGTERM if how.startswith("SIGTERM") else signal.SIGINT
    try:
        rank1 = _worker_pid(proc.pid, 1)
        _wait_for_step(proc, out, 3)
        if sig == signal.SIGTERM:
            os.kill(rank1, sig)
        else:
            os.killpg(proc.pid, sig)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0, "torchrun reports the stopped workers"
    # torchrun prints its own report (ChildFailedError, or SignalException when it got the signal
    # itself); the workers print no traceback and exit with the shell's status
    if sig == signal.SIGTERM:
        status = 128 + sig
        assert f"exitcode  : {status}" in stderr, stderr[-3000:]
        assert not re.search(rf"exitcode\s*: (?!{status})", stderr), stderr[-3000:]
    assert "fastclip/train/" not in stderr and "second SIG" not in stderr, stderr[-3000:]
    (line,) = [x for x in stderr.splitlines() if f"fastclip train: stopped by {sig.name} after step" in x]
    step = int(line.split("after step ")[1].split(";")[0])
    meta = ckpt.verify(ckpt.find_latest(os.path.join(out, "checkpoints")))
    assert meta["step"] == step and meta["world_size"] == 2
    assert max(_losses(out)) == step, "no rank trained past the agreed step"


@pytest.mark.distributed
@pytest.mark.slow
def test_two_ranks_refuse_a_locked_directory_together(tmp_path):
    """Rank 0 cannot take the lock: every rank stops (none waits for the others), nothing moved."""
    out = str(tmp_path / "run")
    lock = rundir.RunLock.acquire(out)
    try:
        (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
        p = _run(_torchrun(out), timeout=120)
    finally:
        lock.release()
    assert p.returncode != 0
    lines = _lines(p.stderr)
    # Two processes write to stderr through torchrun: their lines arrive in either order (a CI run on
    # 2026-12-05 got rank 1's first), so each is looked for among the lines.
    held = f"fastclip train: error: output_dir: {out} is in use by another fastclip run (pid {os.getpid()})"
    assert any(held in x for x in lines), p.stderr[-3000:]
    assert any("rank 0 could not take" in x for x in lines), p.stderr[-3000:]
    assert sorted(os.listdir(out)) == [rundir.LOCK, "metrics.jsonl"]


def test_cpu_threads_do_not_follow_the_load(monkeypatch):
    from fastclip.train import parallel

    cores = len(os.sched_getaffinity(0))
    monkeypatch.setattr(os, "getloadavg", lambda: (float(cores) + 5.0, 0.0, 0.0))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    busy = parallel.cpu_threads()
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert parallel.cpu_threads() == busy == max(1, min(8, cores))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(2 * cores))
    assert parallel.cpu_threads() == 1


def test_the_summary_says_what_this_process_trained():
    from fastclip.train.cli import trained_line

    assert trained_line("tiny", 0, 300, 55.2) == "trained tiny for 300 steps in 55 s"
    assert trained_line("tiny", 100, 300, 55.2) == (
        "trained tiny steps 101-300 (200 steps, resumed at step 100) in 55 s"
    )
    assert trained_line("tiny", 300, 300, 0.4) == "trained no steps: the run was already complete at step 300"


# ---- the lock ------------------------------------------------------------------------------------


def test_lock_names_the_holder_and_a_crashed_holder_is_detectably_stale(tmp_path):
    out = str(tmp_path / "run")
    lock = rundir.RunLock.acquire(out)
    assert lock.stale_pid is None and open(os.path.join(out, rundir.LOCK)).read() == f"{os.getpid()}\n"
    with pytest.raises(
        rundir.OutputDirBusy, match=rf"is in use by another fastclip run \(pid {os.getpid()}\)"
    ):
        rundir.RunLock.acquire(out)
    lock.release()
    lock.release()  # idempotent
    again = rundir.RunLock.acquire(out)
    assert again.stale_pid is None, "a clean release leaves nothing stale"
    again.release()
    # a holder killed with SIGKILL: the kernel drops its flock, the file keeps its pid
    code = f"from fastclip.train import rundir; import os; rundir.RunLock.acquire({out!r}); os.kill(os.getpid(), 9)"
    child = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, timeout=60)
    assert child.returncode == -signal.SIGKILL
    pid = int(open(os.path.join(out, rundir.LOCK)).read())
    taken = rundir.RunLock.acquire(out)
    assert taken.stale_pid == pid != os.getpid()
    taken.release()


def test_clean_leftovers_removes_only_what_a_killed_run_leaves(tmp_path):
    out = tmp_path / "run"
    root = out / "checkpoints"
    (root / "step_00000004.partial" / "ds").mkdir(parents=True)
    (root / "step_00000002").mkdir()
    (root / "latest").write_text("step_00000002\n")
    (root / "latest.tmp1234").write_text("step_000")
    (root / "notes.tmp5").write_text("mine")
    (out / "metrics.jsonl.tmp").write_text("{")
    assert rundir.clean_leftovers(str(out)) == [
        "checkpoints/latest.tmp1234",
        "checkpoints/step_00000004.partial",
        "metrics.jsonl.tmp",
    ]
    assert sorted(os.listdir(root)) == ["latest", "notes.tmp5", "step_00000002"]


# ---- latest as a link --------------------------------------------------------------------------


def test_latest_linking_outside_is_refused_and_nothing_is_moved(tmp_path, capsys):
    from fastclip.cli import main

    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    os.symlink("/etc", out / "checkpoints" / "latest")
    with pytest.raises(ckpt.CheckpointError, match=r"latest: a link to '/etc'; expected a one-line file"):
        ckpt.find_latest(str(out / "checkpoints"))
    with pytest.raises(ckpt.CheckpointError, match="a link to '/etc'"):
        ckpt.resolve(str(out / "checkpoints"))
    assert main(["train", "--output-dir", str(out), *RUN, "--train.threads", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "fastclip train: error: " in err and "a link to '/etc'" in err, err
    assert sorted(os.listdir(out)) == [rundir.LOCK, "checkpoints", "metrics.jsonl"], "nothing moved aside"
    os.remove(out / "checkpoints" / "latest")
    (out / "checkpoints" / "latest").mkdir()  # a directory named latest: refused too
    with pytest.raises(ckpt.CheckpointError, match="latest: not a regular file"):
        ckpt.find_latest(str(out / "checkpoints"))


# ---- a read-only output directory -----------------------------------------------------------------


@pytest.fixture
def read_only_dir(tmp_path):
    """A real read-only filesystem (a tmpfs mounted ro): chmod does not stop root."""
    if os.geteuid() != 0:
        d = tmp_path / "ro"
        d.mkdir()
        os.chmod(d, 0o555)
        yield str(d)
        os.chmod(d, 0o755)
        return
    d = tmp_path / "ro"
    d.mkdir()
    p = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(d)], capture_output=True, text=True
    )
    if p.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here (root without mount rights): {p.stderr.strip()}")
    try:
        yield str(d)
    finally:
        subprocess.run(["umount", str(d)], capture_output=True)


@pytest.mark.parametrize("sub", ["", "run"])
def test_read_only_output_dir_is_one_line_naming_the_path(read_only_dir, sub, capsys):
    import torch.distributed as dist

    from fastclip.cli import main

    if dist.is_initialized():  # left by an earlier in-process run of this pytest process: not ours to test
        dist.destroy_process_group()
    out = os.path.join(read_only_dir, sub) if sub else read_only_dir
    assert main(["train", "--output-dir", out, *RUN, "--train.threads", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(f"fastclip train: error: output_dir: cannot write to {out}: "), err
    assert "Read-only file system" in err or "Permission denied" in err, err
    assert not dist.is_initialized(), "refused before any process group starts"


@pytest.mark.slow
def test_a_disk_that_fills_mid_run_is_one_line(tmp_path):
    """metrics.jsonl cannot be appended (ENOSPC on a tiny tmpfs): one error line naming the file."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    d = tmp_path / "small"
    d.mkdir()
    p = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(d)], capture_output=True, text=True
    )
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {p.stderr.strip()}")
    try:
        free = os.statvfs(d).f_bavail * os.statvfs(d).f_frsize
        with open(d / "filler", "wb") as f:  # leave 6 pages: the run files fit, 100 metrics rows do not
            f.write(b"\0" * max(0, free - 24 * 1024))
        p = _run(_cmd(str(d / "run")))
    finally:
        subprocess.run(["umount", str(d)], capture_output=True)
    assert p.returncode == 1, (p.stdout + p.stderr)[-3000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    (line,) = _lines(p.stderr)
    assert "No space left on device" in line and str(d / "run") in line, line


# ---- configs -------------------------------------------------------------------------------------


def _bomb(levels: int) -> str:
    lines = ["eval:", "  templates: [&a0 [" + ", ".join(["'{} x'"] * 9) + "]"]
    for i in range(1, levels):
        lines[-1] += f", &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]"
    return "\n".join(lines) + "]\n"


def test_yaml_aliases_are_refused_before_values_are_built(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(_bomb(4))  # 9**4 strings once expanded: its error line was 480 kB
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert time.perf_counter() - t0 < 2.0
    msg = str(info.value)
    assert len(msg) < 300 and "line 2: YAML anchor &a0 refused" in msg and str(path) in msg, msg
    (tmp_path / "alias.yaml").write_text("train:\n  steps: 3\nlog:\n  every: *x\n")
    with pytest.raises(ConfigError, match=r"line 4: YAML alias \*x refused"):
        load_config(str(tmp_path / "alias.yaml"))
    from fastclip.train.config_values import parse_value

    with pytest.raises(ConfigError, match="YAML anchor &a refused"):
        parse_value("[&a [1, 2], *a]")


def test_the_full_alias_bomb_ends_at_once(tmp_path):
    """The issue's file (nine aliases per level, 9 levels): it held 1.9 GB for 90 s; now one line."""
    path = tmp_path / "bomb.yaml"
    path.write_text(_bomb(9))
    p = _run(
        [
            sys.executable,
            "-m",
            "fastclip.cli",
            "train",
            "--config",
            str(path),
            "--output-dir",
            str(tmp_path / "r"),
        ],
        timeout=60,
    )
    assert p.returncode == 2, p.stderr[-2000:]
    (line,) = _lines(p.stderr)
    assert "YAML anchor &a0 refused" in line and len(line) < 400, line


def test_error_messages_cap_a_long_value():
    big = [f"template {i}" for i in range(100_000)]  # no "{}": refused
    with pytest.raises(ConfigError) as info:
        load_config(None, {"eval.templates": big})
    msg = str(info.value)
    assert msg.startswith("eval.templates: expected a non-empty list of strings with '{}', got ['template 0'")
    assert len(msg) < 400 and "(list, 100000 items)" in msg, msg
    with pytest.raises(ConfigError) as info:
        load_config(None, {"train.steps": "9" * 10_000 + "x"})
    assert len(str(info.value)) < 400 and "(str, 10001 characters)" in str(info.value)


def test_checkpoint_errors_cap_a_long_value(tmp_path):
    step = tmp_path / "step_00000001"
    step.mkdir()
    (step / "MANIFEST.json").write_text(
        json.dumps({"files": {"trainer.json": {"size": 1, "sha256": "a" * 100_000}}})
    )
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.verify(str(step))
    assert "key 'sha256': expected 64 hex digits, got 'aaaa" in str(info.value)
    assert len(str(info.value)) < 600 and "(str, 100000 characters)" in str(info.value)


def test_every_unknown_key_is_reported_with_suggestions_by_meaning(tmp_path):
    path = tmp_path / "typos.yaml"
    path.write_text(
        "optim:\n  learning_rate: 1.0e-3\n  wd: 0.1\ntrain:\n  stepz: 5\n  lr: 0.1\n  max_steps: 3\n"
        "optimizer: {}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(str(path), {"train.num_workers": 2})
    msg = str(info.value)
    assert msg.startswith(f"{path}: 7 unknown config names: "), msg
    for piece in (
        "key 'optim.learning_rate' (did you mean 'optim.lr'?)",
        "key 'optim.wd' (did you mean 'optim.weight_decay'?)",
        "key 'train.stepz' (did you mean 'train.steps'?)",
        "key 'train.lr' (did you mean 'optim.lr'?)",
        "key 'train.max_steps' (did you mean 'train.steps'?)",
        "section 'optimizer' (did you mean 'optim'?)",
        "key 'train.num_workers' (did you mean 'data.workers'?)",
    ):
        assert piece in msg, piece
    assert "min_lr_ratio" not in msg
    with pytest.raises(
        ConfigError, match=r"^unknown config key 'optim.learning_rate' \(did you mean 'optim.lr'\?\)$"
    ):
        Config.from_dict({"optim": {"learning_rate": 1e-3}})


def test_help_describes_every_option():
    p = _run([sys.executable, "-m", "fastclip.cli", "train", "--help"], timeout=60)
    assert p.returncode == 0, p.stderr
    options, current = {}, None
    for line in p.stdout.splitlines():
        m = re.match(r"^  (-[-\w.]+)(.*)$", line)
        if m:  # an option line: its names and metavars, maybe the start of its help after 2+ spaces
            current = m.group(1)
            sig_and_help = re.split(r"\s{2,}", m.group(2).rstrip(), maxsplit=1)
            options[current] = sig_and_help[1] if len(sig_and_help) > 1 else ""
        elif current and line.startswith(" " * 10) and line.strip():
            options[current] += " " + line.strip()
        else:
            current = None
    keys = [
        f"--{k}"
        for k in __import__("fastclip.train.config", fromlist=["all_keys"]).all_keys()
        if k != "output_dir"
    ]
    assert set(keys) <= set(options), set(keys) - set(options)
    bare = {o: h for o, h in options.items() if not re.sub(r"\(default: .*\)", "", h).strip()}
    assert not bare, f"options without a description: {sorted(bare)}"
    for o in ("--train.steps", "--log.progress", "--optim.lr", "--eval.batch_size", "--output-dir"):
        assert len(re.sub(r"\(default: .*\)", "", options[o]).split()) >= 3, (o, options[o])
