"""``wsi-her2 status``: done / running / failed / pending per slide of a cohort output folder."""
from __future__ import annotations

import argparse
import json
import sys

from wsi_her2.cli.exits import ExitCode


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="show what a cohort run has done: done / running / failed / pending per slide",
                       description="Exit code: 0 every slide done, 1 some failed, 3 some pending or running.")
    p.add_argument("out", help="cohort output folder (the -o of `wsi-her2 run`)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--lock-timeout", type=float, default=300.0, help="seconds without heartbeat before a lock counts as abandoned")
    p.set_defaults(func=run)


def collect(out_dir, *, lock_timeout_s: float = 300.0) -> list[dict]:
    """One dict per slide: slide, status (done/running/failed/pending), stage, attempts, reason, owner."""
    from pathlib import Path

    from wsi_her2.batch.runner import COHORT_FILE
    from wsi_her2.batch.state import STATE_DIRNAME, StateStore, lock_staleness
    from wsi_her2.errors import ConfigError

    out_dir = Path(out_dir)
    if not (out_dir / COHORT_FILE).is_file() and not (out_dir / STATE_DIRNAME).is_dir():
        raise ConfigError(f"{out_dir}: not a cohort output folder (no {COHORT_FILE}); run `wsi-her2 run ... -o {out_dir}` first")
    ids: list[str] = []
    if (out_dir / COHORT_FILE).is_file():
        ids = [j["slide_id"] for j in json.loads((out_dir / COHORT_FILE).read_text())["jobs"]]
    store = StateStore(out_dir, lock_timeout_s=lock_timeout_s)
    states = store.read_all()
    rows = []
    for sid in sorted(set(ids) | set(states)):
        st = states.get(sid)
        info = store.lock_info(sid)
        stale = lock_staleness(store.lock_path(sid), info, timeout_s=lock_timeout_s) if info is not None else None
        row = {"slide": sid, "status": st.status if st else "pending", "stage": st.stage if st else None,
               "attempts": st.attempts if st else 0, "reason": None, "owner": None}
        if st is not None and st.status == "failed":
            row["reason"] = f"{st.error_type}: {st.reason}"
            row["retry_next_run"] = st.retryable
        elif st is not None and st.status == "done" and st.row:
            row["her2_score"] = st.row.get("her2_score")
        if info is not None and stale is None and row["status"] not in ("done", "failed"):
            row["status"] = "running"
            row["owner"] = f"{info.get('hostname')}:{info.get('pid')}"
        elif row["status"] == "running":  # a state says running but nobody holds the lock any more
            row["status"] = "pending"
            row["reason"] = f"interrupted ({stale})" if stale else "interrupted"
        rows.append(row)
    return rows


def run(args: argparse.Namespace) -> int:
    rows = collect(args.out, lock_timeout_s=args.lock_timeout)
    counts = {k: sum(1 for r in rows if r["status"] == k) for k in ("done", "running", "failed", "pending")}
    if args.json:
        print(json.dumps({"counts": counts, "slides": rows}, indent=1))
    else:
        width = max([5] + [len(r["slide"]) for r in rows])
        print(f"{'slide'.ljust(width)}  {'status':8} {'stage':6} {'tries':>5}  detail")
        for r in rows:
            detail = r.get("reason") or (f"HER2 {r['her2_score']}" if r.get("her2_score") else "") or (r["owner"] or "")
            if r["status"] == "running":
                detail = f"on {r['owner']}"
            print(f"{r['slide'].ljust(width)}  {r['status']:8} {(r['stage'] or '-'):6} {r['attempts']:>5}  {detail}")
        print(", ".join(f"{v} {k}" for k, v in counts.items()) + f" of {len(rows)} slides", file=sys.stderr)
    if counts["failed"]:
        return ExitCode.PROBLEMS
    return ExitCode.UNFINISHED if counts["running"] or counts["pending"] else ExitCode.OK
