"""Run a grid of trials (robots x cells x seeds) on Ray, then write its report (experiments/report.py).

    pip install -r experiments/requirements.txt
    python experiments/sweep.py experiments/grids/headline.yaml            # local Ray, one trial per core
    python experiments/sweep.py experiments/grids/robots.yaml --address auto   # a running Ray cluster

A grid file (YAML; see experiments/grids/):
    name: ablations                  # trials are runs/<env_id>__<name>-<cell>__<seed>__<time>
    script: dt_grpo.py               # the default script of the cells (baselines/odt.py, qgrpo.py, ...)
    env_ids: [Hopper-v4]
    seeds: [1, 2, 3]
    flags: {total-env-steps: 250000} # given to every trial ({env_id} is replaced)
    cells:                           # the rows of the table: each adds flags (and may set `script`)
      reference: {}
      alive-keep: {alive-bonus: 1.0}
      walker-only: {env_ids: [Walker2d-v4]}   # a cell (or a prepare step) may name the robots it is for
    prepare:                         # shell commands run once per robot before its trials, unless `creates` exists
      - {creates: "checkpoints/{env_id}__random.pt", run: "python pretrain.py --env-id {env_id} --torch-threads 1"}
      - {creates: "...", run: "...", cells: [alive-keep]}   # a step only the named cells need
      - {creates: "b", run: "...", inputs: ["a"]}          # the step that creates "a" runs first if "b" must be made

Each trial is one process of its script with --torch-threads = --cpus-per-trial and its own run folder; its log
is sweeps/<name>/<trial>.log. A failed trial is retried once, from its last checkpoint (--resume) when it left one.
Finished trials are recorded in sweeps/<name>/<trial>.json and skipped when the sweep runs again; an unfinished
one resumes from its checkpoint. On a cluster, every node needs the repository (and runs/) at the same path, for
instance on a shared filesystem: the trials run where Ray places them.
"""

import argparse
import glob
import itertools
import json
import os
import re
import subprocess
import sys
import time

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class GridError(Exception):
    pass


def load_grid(path):
    """The grid file as a dict, checked: one clear line for what is missing or misspelt."""
    if not os.path.isfile(path):
        raise GridError(f"grid file {path!r} not found (grids live in experiments/grids/)")
    with open(path) as f:
        try:
            g = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise GridError(f"{path} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(g, dict):
        raise GridError(f"{path}: expected a mapping with name, env_ids, seeds, cells")
    unknown = set(g) - {"name", "script", "env_ids", "seeds", "flags", "cells", "prepare"}
    if unknown:
        raise GridError(f"{path}: unknown keys {sorted(unknown)}")
    for key in ("name", "env_ids", "seeds"):
        if not g.get(key):
            raise GridError(f"{path}: `{key}` is required")
    g.setdefault("script", "dt_grpo.py")
    g.setdefault("flags", {})
    g["cells"] = g.get("cells") or {"default": {}}
    g.setdefault("prepare", [])
    check_types(path, g)
    for cell in g["cells"].values():
        if not os.path.isfile(os.path.join(ROOT, (cell or {}).get("script", g["script"]))):
            raise GridError(f"{path}: script {(cell or {}).get('script', g['script'])!r} not found")
    return g


def check_types(path, g):
    """Types and nested keys of a grid, so that `seeds: 1` or `env_ids: Hopper-v4` (a string is iterated letter by
    letter) fail with one line instead of making wrong trials."""
    def need(ok, what):
        if not ok:
            raise GridError(f"{path}: {what}")

    safe = re.compile(r"^[A-Za-z0-9_.-]+$")
    need(isinstance(g["name"], str) and safe.match(g["name"]), "`name` must be a word (letters, digits, _ . -)")
    need(isinstance(g["script"], str), "`script` must be a path")
    need(isinstance(g["env_ids"], list) and all(isinstance(e, str) for e in g["env_ids"]),
         "`env_ids` must be a list of env ids, e.g. [Hopper-v4]")
    need(isinstance(g["seeds"], list) and all(isinstance(s, int) and not isinstance(s, bool) for s in g["seeds"]),
         "`seeds` must be a list of integers, e.g. [1, 2, 3]")
    need(isinstance(g["flags"], dict), "`flags` must be a mapping of flag: value")
    need(isinstance(g["cells"], dict), "`cells` must be a mapping of cell name: {flag: value}")
    for name, cell in g["cells"].items():
        need(isinstance(name, str) and safe.match(name), f"cell name {name!r} must be a word (letters, digits, _ . -)")
        need(cell is None or isinstance(cell, dict), f"cell {name!r} must be a mapping of flag: value")
        need(not isinstance((cell or {}).get("env_ids", []), str), f"cell {name!r}: `env_ids` must be a list")
    need(isinstance(g["prepare"], list), "`prepare` must be a list of {creates, run} steps")
    for step in g["prepare"]:
        need(isinstance(step, dict) and isinstance(step.get("run"), str)
             and set(step) <= {"creates", "run", "env_ids", "cells", "inputs"},
             f"prepare step {step!r} must be a mapping with `run` (and optionally `creates`, `env_ids`, `cells`, "
             "`inputs`) only")
        need(isinstance(step.get("inputs", []), list), f"prepare step {step['run']!r}: `inputs` must be a list of paths")
        need(set(step.get("cells", [])) <= set(g["cells"]) and not isinstance(step.get("cells", []), str),
             f"prepare step {step.get('creates', step['run'])!r}: `cells` must be a list of the grid's cells")


def select(g, seeds=None, env_ids=None, cells=None):
    """The grid narrowed to some of its seeds, robots and cells (a sweep split across sessions or machines)."""
    for flag, chosen, key in (("--seeds", seeds, "seeds"), ("--env-ids", env_ids, "env_ids"),
                              ("--cells", cells, "cells")):
        if not chosen:
            continue
        if not set(chosen) <= set(g[key]):
            raise GridError(f"{flag} {' '.join(map(str, chosen))}: not all among the grid's {key} "
                            f"{' '.join(map(str, g[key]))}")
        kept = [x for x in g[key] if x in chosen]  # the grid's order
        g[key] = {c: g[key][c] for c in kept} if key == "cells" else kept
    return g


def trials(g):
    """Every (env_id, cell, seed) of the grid, with its command line and its experiment name."""
    out = []
    for env_id, (cell, extra), seed in itertools.product(g["env_ids"], g["cells"].items(), g["seeds"]):
        extra = dict(extra or {})
        if env_id not in extra.pop("env_ids", [env_id]):  # a cell may name the robots it runs on
            continue
        script = extra.pop("script", g["script"])
        flags = {**g["flags"], **extra}
        argv = []
        for k, v in flags.items():
            if isinstance(v, bool):  # tyro's booleans: --flag / --no-flag
                argv.append(f"--{k}" if v else f"--no-{k}")
            else:
                argv += [f"--{k}", str(v).format(env_id=env_id)]
        exp = f"{g['name']}-{cell}"
        out.append(dict(id=f"{env_id}__{cell}__seed{seed}", env_id=env_id, cell=cell, seed=seed, exp=exp,
                        cmd=[sys.executable, os.path.join(ROOT, script), "--env-id", env_id, "--seed", str(seed),
                             "--exp-name", exp, *argv]))
    return out


def trial_runs(trial, workdir):
    """This trial's run folders under workdir/runs, oldest first."""
    pattern = os.path.join(workdir, "runs", f"{trial['env_id']}__{trial['exp']}__{trial['seed']}__*")
    return sorted(glob.glob(pattern), key=os.path.getmtime)


def last_checkpoint(trial, workdir):
    """The checkpoint of this trial's newest run folder, if an earlier attempt left one."""
    runs = [r for r in trial_runs(trial, workdir) if os.path.isfile(os.path.join(r, "checkpoint.pt"))]
    return os.path.relpath(os.path.join(runs[-1], "checkpoint.pt"), workdir) if runs else None


def prepare(g, env_id, workdir, cells):
    """The prepare steps for this robot that the given cells need: a step naming `cells` is for those alone, and a
    step also runs when a later step that runs lists its `creates` among its `inputs` (data are made only when a
    checkpoint that is missing needs them, not for a cell that reads the checkpoint alone)."""
    def path(p):
        return p.format(env_id=env_id)

    needed, wanted = [], set()
    for step in reversed(g["prepare"]):  # the last steps first: they say which earlier outputs they read
        creates = path(step.get("creates", ""))
        if env_id not in step.get("env_ids", [env_id]) or (creates and os.path.exists(os.path.join(workdir, creates))):
            continue
        if set(step.get("cells", cells)) & set(cells) or (creates and creates in wanted):
            needed.insert(0, step)
            wanted |= {path(p) for p in step.get("inputs", [])}
    for step in needed:
        cmd = step["run"].format(env_id=env_id)
        print(f"[sweep] prepare: {cmd}", flush=True)
        if subprocess.run(cmd, shell=True, cwd=workdir).returncode != 0:
            raise GridError(f"prepare step failed: {cmd}")


def run_trial(cmd, log_path, workdir):
    """One trial as a subprocess in workdir; its output goes to its log. Returns the exit code and its seconds."""
    t0 = time.time()
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        return subprocess.run(cmd, cwd=workdir, stdout=log, stderr=subprocess.STDOUT).returncode, time.time() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("grid", help="a grid file, e.g. experiments/grids/headline.yaml")
    p.add_argument("--address", default=None, help="Ray cluster address (`auto` = the running one); default: local")
    p.add_argument("--cpus-per-trial", type=int, default=1, help="Ray CPUs per trial, also its --torch-threads")
    p.add_argument("--num-cpus", type=int, default=None, help="local Ray: CPUs to use (default: all)")
    p.add_argument("--retries", type=int, default=1, help="times a failed trial is run again")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="run only these of the grid's seeds")
    p.add_argument("--env-ids", nargs="+", default=None, help="run only these of the grid's robots")
    p.add_argument("--cells", nargs="+", default=None, help="run only these of the grid's cells")
    p.add_argument("--workdir", default=ROOT, help="where trials run and runs/, sweeps/ live (default: the repo)")
    p.add_argument("--no-report", action="store_true", help="skip experiments/report.py at the end")
    p.add_argument("--list", action="store_true", help="list the trials (done, to resume, to start) and exit")
    p.add_argument("--serial", action="store_true", help="run the trials one after another here, without Ray")
    a = p.parse_args(argv)
    try:
        g = select(load_grid(a.grid), seeds=a.seeds, env_ids=a.env_ids, cells=a.cells)
    except GridError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    workdir = os.path.abspath(a.workdir)
    out_dir = os.path.join(workdir, "sweeps", g["name"])
    os.makedirs(out_dir, exist_ok=True)
    todo = [t for t in trials(g) if not os.path.isfile(os.path.join(out_dir, t["id"] + ".json"))]
    print(f"[sweep] {g['name']}: {len(trials(g))} trials, {len(trials(g)) - len(todo)} done before, "
          f"{len(todo)} to run", flush=True)
    if a.list:  # what a sweep run across sessions has left, without starting anything
        for t in trials(g):
            resume = last_checkpoint(t, workdir)
            state = "to run" if t in todo else "done"
            print(f"{t['id']}: {state}{f' (resumes {resume})' if t in todo and resume else ''}")
        return 0
    try:
        for env_id in dict.fromkeys(t["env_id"] for t in todo):
            prepare(g, env_id, workdir, {t["cell"] for t in todo if t["env_id"] == env_id})
    except GridError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    failed = []
    if todo:
        if a.serial:  # one trial after another in this process, no Ray: a sweep given one core beside other work
            slots, task, first, result = 1, lambda *job: job, lambda refs: refs[0], lambda job: run_trial(*job)
        else:
            import ray

            ray.init(address=a.address, num_cpus=a.num_cpus if a.address is None else None, include_dashboard=False,
                     log_to_driver=False, configure_logging=False)
            slots = max(1, int(ray.cluster_resources().get("CPU", 1)) // a.cpus_per_trial)
            task = ray.remote(run_trial).options(num_cpus=a.cpus_per_trial).remote
            first, result = lambda refs: ray.wait(refs, num_returns=1)[0][0], ray.get
        attempts, durations = {}, []

        def submit(t):
            resume = last_checkpoint(t, workdir)
            cmd = t["cmd"] + ["--torch-threads", str(a.cpus_per_trial)] + (["--resume", resume] if resume else [])
            attempts[t["id"]] = attempts.get(t["id"], 0) + 1
            return task(tuple(cmd), os.path.join(out_dir, t["id"] + ".log"), workdir)

        pending = {submit(t): t for t in todo}
        while pending:
            ref = first(list(pending))
            t = pending.pop(ref)
            rc, seconds = result(ref)
            if rc == 0:
                durations.append(seconds)
                with open(os.path.join(out_dir, t["id"] + ".json"), "w") as f:
                    json.dump(dict(t, run=os.path.relpath(trial_runs(t, workdir)[-1], workdir),
                                   seconds=seconds), f)
            elif attempts[t["id"]] <= a.retries:
                print(f"[sweep] {t['id']} failed (exit {rc}); retrying", flush=True)
                pending[submit(t)] = t
                continue
            else:
                failed.append(t["id"])
                print(f"[sweep] {t['id']} FAILED (exit {rc}); log: {os.path.join(out_dir, t['id'])}.log", flush=True)
            left = len(pending)
            eta = sum(durations) / max(len(durations), 1) * -(-left // slots) if durations else float("nan")
            print(f"[sweep] {len(todo) - left - len(failed)}/{len(todo)} done, {min(left, slots)} running, "
                  f"{left - min(left, slots)} queued, {len(failed)} failed; ETA {eta / 60:.0f} min", flush=True)
        if not a.serial:
            ray.shutdown()
        if failed:
            print(f"[sweep] {len(failed)} trials failed: {', '.join(failed)}; run the sweep again to retry them",
                  flush=True)
    if not a.no_report:
        subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "report.py"), "--grid",
                        os.path.abspath(a.grid), "--workdir", workdir], cwd=workdir)  # the grid from the caller's cwd
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
