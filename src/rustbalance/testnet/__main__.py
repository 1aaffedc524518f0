"""``python -m rustbalance.testnet BASE_DIR``: run a private Tor network until Ctrl-C.

Prints the time to ready, the first client's SOCKS and control addresses, memory use, and the
torrc lines another tor (e.g. the daemon's managed tor) needs to join the network.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from rustbalance.errors import TorProcessError
from rustbalance.testnet.network import DEFAULT_CONSENSUS_PARAMS, PrivateTorNetwork


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rustbalance.testnet", description=__doc__)
    parser.add_argument("base_dir", type=Path, help="directory for keys, data dirs and logs")
    parser.add_argument("--relays", type=int, default=4, help="relays besides the 3 authorities")
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--consensus-params", default=DEFAULT_CONSENSUS_PARAMS)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for ready")
    args = parser.parse_args(argv)

    net = PrivateTorNetwork(
        args.base_dir,
        n_relays=args.relays,
        n_clients=args.clients,
        consensus_params=args.consensus_params,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        net.start(timeout=args.timeout)
    except TorProcessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        client = net.clients[0]
        rss = sum(net.memory_rss_bytes().values()) / 2**20
        print(f"ready after {net.ready_seconds:.1f} s; {len(net.instances)} tors, {rss:.0f} MB RSS")
        print(f"client SOCKS {client.socks_address}, control {client.control_address}")
        print(f"control cookie {client.control_cookie_path}")
        print("torrc lines to join this network:")
        for line in net.client_torrc_lines():
            print(f"  {line}")
        print("Ctrl-C to stop", flush=True)
        try:
            while not stop.wait(1.0):
                if not all(i.is_running() for i in net.instances.values()):
                    print("error: a tor of the network exited; see its tor.log", file=sys.stderr)
                    return 1
        except KeyboardInterrupt:
            pass
    finally:
        net.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
