"""``python -m workers.conformance --worker CMD [--worker CMD ...]``: exit 0 when every check passes."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from collections.abc import Sequence

from workers.conformance.kit import DEFAULT_WORKER, KitConfig, run_sync


def main(argv: Sequence[str] | None = None) -> int:
    d = KitConfig()
    p = argparse.ArgumentParser(
        prog="python -m workers.conformance",
        description="Run a gateway, simulated bots and N instances of worker commands; check the "
        "group's ownership protocol from outside (docs/WORKERS.md, 'The conformance kit').",
    )
    p.add_argument(
        "--worker",
        action="append",
        help=f"a worker command (shell syntax; repeat to mix, instances take them in turn; "
        f"default: {DEFAULT_WORKER})",
    )
    p.add_argument("--instances", type=int, default=d.instances, help="instances at once (>= 2)")
    p.add_argument("--bots-before", type=int, default=d.bots_before, help="bots connected before the group")
    p.add_argument("--bots-after", type=int, default=d.bots_after, help="bots that connect later")
    p.add_argument("--lease-ttl-s", type=float, default=d.lease_ttl_s)
    p.add_argument("--lease-renew-s", type=float, default=d.lease_renew_s)
    p.add_argument("--claim-interval-s", type=float, default=d.claim_interval_s)
    p.add_argument("--frame-ms", type=int, default=d.frame_ms, help="audio frame length the bots send")
    p.add_argument("--slack-s", type=float, default=d.slack_s, help="added to every time bound")
    p.add_argument(
        "--disruptions",
        default=",".join(d.disruptions),
        help="what happens to instances, in order: kill, pause, term (comma-separated)",
    )
    p.add_argument("--redis-url", help="use this Redis (under a key prefix of the run's own)")
    p.add_argument("--cwd", help="directory the worker commands run in (default: here)")
    p.add_argument("--run-dir", help="keep the workers' logs and report.json here")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--log-level", default="warning")
    ns = p.parse_args(argv)
    logging.basicConfig(
        level=ns.log_level.upper(), format="%(asctime)s %(name)s %(message)s", stream=sys.stderr
    )
    config = KitConfig(
        workers=ns.worker or [DEFAULT_WORKER],
        instances=ns.instances,
        bots_before=ns.bots_before,
        bots_after=ns.bots_after,
        lease_ttl_s=ns.lease_ttl_s,
        lease_renew_s=ns.lease_renew_s,
        claim_interval_s=ns.claim_interval_s,
        frame_ms=ns.frame_ms,
        slack_s=ns.slack_s,
        disruptions=tuple(x.strip() for x in ns.disruptions.split(",") if x.strip()),
        redis_url=ns.redis_url,
        cwd=ns.cwd,
        run_dir=ns.run_dir,
    )
    report = run_sync(config)
    print(json.dumps(report.to_json(), indent=2) if ns.json else report.text())
    if report.passed and not ns.run_dir:
        shutil.rmtree(report.run_dir, ignore_errors=True)
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
