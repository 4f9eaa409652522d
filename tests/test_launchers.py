"""Cluster launchers without a cluster: the commands tpu_pod.sh would run (dry run), its worker
script run here with a stand-in trainer, slurm.sbatch under bash with a stand-in srun, the GKE
manifest and the Dockerfile against the README's install."""

import os
import re
import shlex
import signal
import subprocess
import sys
import time

import yaml
from tiny_setup import ROOT

from mm15_jax import launch_commands

LAUNCH = os.path.join(ROOT, "launch")
TRAINER_ARGS = ["--config.profile.steps=(5, 8)", "--config.name=a name with spaces", "--config.x=it's \"$HOME\"", ""]


def tpu_dry_run(*args, env=None):
  out = subprocess.run(["bash", os.path.join(LAUNCH, "tpu_pod.sh"), *args], capture_output=True, text=True,
                       timeout=60, env={**os.environ, "MM15_DRY_RUN": "1", **(env or {})})
  assert out.returncode == 0, out.stderr
  return [shlex.split(line) for line in out.stdout.splitlines() if not line.startswith("#")]


def remote(cmd: list[str]) -> list[str]:
  """The words the worker's shell runs for one `gcloud ... ssh --command=...`."""
  assert cmd[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"], cmd
  (command,) = [a.split("=", 1)[1] for a in cmd if a.startswith("--command=")]
  return shlex.split(command)


def after(words: list[str], marker: str) -> list[str]:
  return words[words.index(marker) + 1:]


def test_tpu_pod_dry_run_copies_installs_and_starts_detached_with_exact_args():
  cmds = tpu_dry_run("--job=exp1", "--env=LIBTPU_INIT_ARGS=--xla_tpu_x=true", "my-tpu", "us-east5-a",
                     "experiments/mm15_3b.py:pretrain", "gs://b/run", *TRAINER_ARGS)
  scp, setup, start = cmds
  assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in scp
  assert scp[5:7] == ["/tmp/mm15_src_exp1.tgz", "my-tpu:/tmp/mm15_src_exp1.tgz"] and "--zone=us-east5-a" in scp
  for cmd in (setup, start):
    assert cmd[5] == "my-tpu" and "--zone=us-east5-a" in cmd and "--worker=all" in cmd
  words = remote(setup)
  assert "tar" in words and after(words, "tar")[:2] == ["-xzf", "/tmp/mm15_src_exp1.tgz"]
  assert after(words, "bash")[:2] == ["launch/tpu_worker.sh", "setup"]
  words = remote(start)
  assert after(words, "bash")[:2] == ["launch/tpu_worker.sh", "start"]
  assert {"--job=exp1", "--log_dir=~/mm15_logs", "--env=LIBTPU_INIT_ARGS=--xla_tpu_x=true"} <= set(words)
  assert after(words, "--") == ["--config=experiments/mm15_3b.py:pretrain", "--workdir=gs://b/run", "--no_progress",
                                *TRAINER_ARGS]


def test_tpu_pod_options_skip_setup_wait_stop_and_logs():
  cmds = tpu_dry_run("--setup=none", "--wait", "--log_dir=/var/log/mm15", "t", "z", "c.py", "gs://w", "--a=1")
  assert len(cmds) == 2  # no copy, no install
  assert "--log_dir=/var/log/mm15" in remote(cmds[0]) and after(remote(cmds[0]), "--")[-1] == "--a=1"
  assert "--worker=0" in cmds[1] and after(remote(cmds[1]), "launch/tpu_worker.sh")[0] == "wait"
  (stop,) = tpu_dry_run("--stop", "--job=exp1", "t", "z")
  assert "--worker=all" in stop and after(remote(stop), "launch/tpu_worker.sh")[:2] == ["stop", "--job=exp1"]
  (logs,) = tpu_dry_run("--logs", "--worker=3", "--job=exp1", "t", "z")
  assert "--worker=3" in logs and remote(logs)[:2] == ["tail", "-n"]
  assert remote(logs)[-1] == "mm15_logs/exp1/worker_*.log"


def test_tpu_pod_bad_usage_names_the_fix():
  for args, message in ((["--bogus", "t", "z", "c", "w"], "unknown option --bogus"),
                        (["t", "z", "c"], "expected TPU_NAME ZONE CONFIG WORKDIR"),
                        (["--setup=pip", "t", "z", "c", "w"], "expected copy or none"),
                        (["--stop", "t", "z", "c"], "--stop takes TPU_NAME ZONE only")):
    out = subprocess.run(["bash", os.path.join(LAUNCH, "tpu_pod.sh"), "--dry_run", *args], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and message in out.stderr, (args, out.stderr)


def test_sweep_and_recipe_tpu_command_waits_for_the_job():
  args = launch_commands.trainer_args("experiments/tiny.py", "gs://b/p", {"train.lr": 0.1}, TRAINER_ARGS)
  cmd = launch_commands.command("tpu", args, "mm15-sweep-0", tpu="my-tpu us-east5-a")
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env={**os.environ, "MM15_DRY_RUN": "1"})
  assert out.returncode == 0, out.stderr
  cmds = [shlex.split(line) for line in out.stdout.splitlines() if not line.startswith("#")]
  assert after(remote(cmds[-2]), "--") == args and "--job=mm15-sweep-0" in remote(cmds[-2])
  assert after(remote(cmds[-1]), "launch/tpu_worker.sh")[0] == "wait"


FAKE_TRAINER = """#!/usr/bin/env bash
[[ $1 == -c ]] && exit 0  # the import check
printf '%s\\n' "$@" > "$(dirname "$0")/args"
echo "MM15_DISTRIBUTED=$MM15_DISTRIBUTED FLAG=$FLAG"
trap 'echo saving on SIGTERM; exit 0' TERM
while true; do sleep 0.05; done
"""


def test_tpu_worker_runs_the_trainer_detached_and_stops_it_with_sigterm(tmp_path):
  venv = tmp_path / "venv"
  os.makedirs(venv / "bin")
  (venv / "bin" / "python").write_text(FAKE_TRAINER)
  os.chmod(venv / "bin" / "python", 0o755)
  env = {**os.environ, "MM15_WORKER_ID": "2"}
  opts = ["--job=j", f"--log_dir={tmp_path}/logs", f"--venv={venv}"]

  def worker(mode, *args, check=True):
    out = subprocess.run(["bash", os.path.join(LAUNCH, "tpu_worker.sh"), mode, *opts, *args], capture_output=True,
                         text=True, timeout=60, env=env, cwd=ROOT)
    assert not check or out.returncode == 0, out.stderr
    return out

  worker("start", "--env=FLAG=on", "--", *TRAINER_ARGS)
  files = tmp_path / "logs" / "j"
  pid = int((files / "worker_2.pid").read_text())
  assert os.getsid(pid) != os.getsid(0)  # its own session: a closed ssh does not reach it
  assert "running" in worker("status").stdout
  again = worker("start", "--", "--x", check=False)
  assert again.returncode == 2 and "already running" in again.stderr
  deadline = time.time() + 10
  while not (venv / "bin" / "args").exists() and time.time() < deadline:
    time.sleep(0.05)
  assert (venv / "bin" / "args").read_text().splitlines() == ["-m", "mm15_jax.train", *TRAINER_ARGS]
  assert "stopped (status 0)" in worker("stop", "--timeout=20").stdout
  log = (files / "worker_2.log").read_text()
  assert "MM15_DISTRIBUTED=1 FLAG=on" in log and "saving on SIGTERM" in log  # SIGTERM, not SIGKILL
  assert (files / "worker_2.rc").read_text().strip() == "0"
  assert worker("wait").returncode == 0


def sbatch_options(text: str) -> dict:
  return dict(re.match(r"#SBATCH --([\w-]+)(?:=(.*))?$", line).groups() for line in text.splitlines()
              if line.startswith("#SBATCH"))


def test_slurm_script_asks_for_sigterm_before_the_limit_and_requeue():
  options = sbatch_options(open(os.path.join(LAUNCH, "slurm.sbatch")).read())
  kind, _, seconds = options["signal"].partition("@")
  assert kind in ("TERM", "B:TERM") and int(seconds) >= 60
  assert "requeue" in options and int(options["cpus-per-task"]) > 0
  assert options["output"] and options["error"] and options["open-mode"] == "append"


def fake_slurm(tmp_path, srun_body: str) -> dict:
  """PATH with a stand-in srun and scontrol; MM15_SETUP and MM15_VENV files that leave marks."""
  bin_dir = tmp_path / "bin"
  os.makedirs(bin_dir)
  for name, body in (("srun", srun_body), ("scontrol", 'echo "$@" > "$MARKS/scontrol"')):
    (bin_dir / name).write_text("#!/usr/bin/env bash\n" + body + "\n")
    os.chmod(bin_dir / name, 0o755)
  os.makedirs(tmp_path / "venv" / "bin")
  (tmp_path / "venv" / "bin" / "activate").write_text("export VENV_ACTIVE=1\n")
  (tmp_path / "setup.sh").write_text(f"export PATH={bin_dir}:{os.path.dirname(sys.executable)}:$PATH\n")
  return {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "MARKS": str(tmp_path), "SLURM_JOB_ID": "77",
          "SLURM_CPUS_PER_TASK": "16", "MM15_SETUP": str(tmp_path / "setup.sh"), "MM15_VENV": str(tmp_path / "venv")}


def test_slurm_script_activates_the_environment_and_passes_arguments_exactly(tmp_path):
  env = fake_slurm(tmp_path, 'printf "%s\\n" "$@" > "$MARKS/argv"\n'
                             'echo "$VENV_ACTIVE $SRUN_CPUS_PER_TASK" > "$MARKS/env"')
  out = subprocess.run(["bash", os.path.join(LAUNCH, "slurm.sbatch"), "experiments/x.py:sft", "/shared/a b",
                        *TRAINER_ARGS], capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
  assert out.returncode == 0, out.stderr
  assert (tmp_path / "argv").read_text().split("\n")[:-1] == [
      "--kill-on-bad-exit=1", "env", "MM15_DISTRIBUTED=1", "python", "-m", "mm15_jax.train",
      "--config=experiments/x.py:sft", "--workdir=/shared/a b", "--no_progress", *TRAINER_ARGS]
  assert (tmp_path / "env").read_text().split() == ["1", "16"]
  assert not (tmp_path / "scontrol").exists()  # finished: no requeue

  out = subprocess.run(["bash", os.path.join(LAUNCH, "slurm.sbatch"), "c.py", "w"], capture_output=True, text=True,
                       timeout=60, env={**env, "MM15_SETUP": "", "MM15_VENV": ""}, cwd=tmp_path)
  assert out.returncode == 2 and "MM15_VENV" in out.stderr  # no python with mm15_jax on /usr/bin:/bin


def test_slurm_script_forwards_sigterm_and_requeues(tmp_path):
  env = fake_slurm(tmp_path, 'trap \'echo TERM > "$MARKS/srun_term"; exit 0\' TERM\n'
                             'touch "$MARKS/srun_up"; while true; do sleep 0.05; done')
  proc = subprocess.Popen(["bash", os.path.join(LAUNCH, "slurm.sbatch"), "c.py", "w"], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
  deadline = time.time() + 30
  while not (tmp_path / "srun_up").exists() and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)  # what --signal=B:TERM@N delivers to the batch shell
  stdout, stderr = proc.communicate(timeout=30)
  assert proc.returncode == 0, stderr
  assert (tmp_path / "srun_term").exists() and (tmp_path / "scontrol").read_text().split() == ["requeue", "77"]


def gke_pod_spec(doc):
  return doc["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]


def test_gke_jobset_survives_preemption_and_mounts_the_data_bucket():
  doc = yaml.safe_load(open(os.path.join(LAUNCH, "gke_jobset.yaml")))
  assert doc["spec"]["failurePolicy"]["maxRestarts"] >= 3
  job = doc["spec"]["replicatedJobs"][0]["template"]["spec"]
  assert job["backoffLimit"] == 0
  pod = gke_pod_spec(doc)
  assert pod["metadata"]["annotations"]["gke-gcsfuse/volumes"] == "true"
  spec = pod["spec"]
  assert spec["restartPolicy"] == "Never" and spec["terminationGracePeriodSeconds"] >= 300
  (volume,) = [v for v in spec["volumes"] if "csi" in v]
  assert volume["csi"]["driver"] == "gcsfuse.csi.storage.gke.io" and volume["csi"]["volumeAttributes"]["bucketName"]
  container = spec["containers"][0]
  assert any(m["name"] == volume["name"] and m["mountPath"] == "/data" for m in container["volumeMounts"])
  assert container["command"][:3] == ["python", "-m", "mm15_jax.train"]
  # The sweep and recipe rewrite the name and the command (a one-line `command: [...]`).
  args = launch_commands.trainer_args("experiments/tiny.py", "gs://b/x", {}, TRAINER_ARGS)
  doc = yaml.safe_load(launch_commands.gke_manifest(args, "mm15-x"))
  assert doc["metadata"]["name"] == "mm15-x"
  assert gke_pod_spec(doc)["spec"]["containers"][0]["command"] == ["python", "-m", "mm15_jax.train", *args]
  assert gke_pod_spec(doc)["spec"]["terminationGracePeriodSeconds"] >= 300


def test_dockerfile_installs_the_way_the_readme_does():
  readme = open(os.path.join(ROOT, "README.md")).read()
  main = re.search(r"<!-- main-command -->\s*```sh\n(.*?)\n```", readme, re.DOTALL).group(1)
  steps = [s.strip() for s in main.split("&&")]
  install = steps[:next(i for i, s in enumerate(steps) if s.startswith("python -m mm15_jax.train"))]
  assert install[-1] == "pip install -e ."
  runs = [line[4:] for line in open(os.path.join(ROOT, "Dockerfile")).read().splitlines() if line.startswith("RUN ")]
  (run,) = [r for r in runs if "pip install" in r]
  docker_steps = [s.strip() for s in run.split("&&")]
  assert docker_steps[:-1] == install[:-1]
  # The TPU runtime, gs:// paths, every source kind.
  assert shlex.split(docker_steps[-1]) == ["pip", "install", "-e", ".[tpu,gcp,parquet,tfds]"]
  setup = open(os.path.join(ROOT, "setup.py")).read()
  assert re.search(r'"tpu": \[', setup)  # the extra exists
  copied = " ".join(line for line in open(os.path.join(ROOT, "Dockerfile")).read().splitlines()
                    if line.startswith("COPY "))
  for path in ("setup.py", "mm15_jax", "data_pipelines", "experiments"):
    assert path in copied.split()
