#!/usr/bin/env python3
"""Scan benchmark: portfleet-agent against masscan and nmap, same work, same run.

    sudo bench/scan_bench.py            # workloads (a) and (b), 3 runs each
    sudo bench/scan_bench.py --full     # also (c): 254 hosts x 65535 ports
    sudo bench/scan_bench.py --runs 5 --tools portfleet,masscan
    sudo bench/scan_bench.py --tools portfleet --ring-sweep   # drops vs ring size

Builds two network namespaces joined by a veth pair (TSO/GSO off, static
neighbours, no default route: nothing can leave them). The target namespace
answers for all of 198.18.1.0/24 and listens on 8 ports, so every host has
the same 8 open ports. Workloads:

    (a) 1 host x ports 1-65535
    (b) 254 hosts x ports 1-1000
    (c) 254 hosts x ports 1-65535 (--full)

For each tool it prints medians of wall time, probes per second (planned
probes / wall time, end to end), CPU seconds, peak RSS and found/expected,
then the ratios portfleet/masscan and portfleet/nmap. Needs root; installs
masscan, nmap, ethtool and time from Debian's packages when missing.
Probes only the addresses inside the namespaces it creates.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from netbench import Net, sh

ROOT = Path(__file__).resolve().parent.parent
SCANNER, TARGET = "pfbench-s", "pfbench-t"
S_IF, T_IF = "pfbench0", "pfbench1"
S_IP, T_IP = "198.19.0.1", "198.19.0.2"
LIVE = "198.18.1.0/24"
OPEN_PORTS = [21, 22, 80, 139, 443, 445, 631, 993]


def ensure_tools():
    missing = [pkg for tool, pkg in [("masscan", "masscan"), ("nmap", "nmap"), ("ethtool", "ethtool")]
               if shutil.which(tool) is None]
    if not Path("/usr/bin/time").exists():
        missing.append("time")
    if missing:
        print(f"installing {' '.join(missing)} ...", file=sys.stderr)
        sh("apt-get", "install", "-y", *missing)


def build_agent():
    print("building portfleet-agent (release) ...", file=sys.stderr)
    subprocess.run(["cargo", "build", "--release", "-p", "portfleet-agent"], cwd=ROOT, check=True)
    return ROOT / "target" / "release" / "portfleet-agent"


NET = Net(SCANNER, TARGET, S_IF, T_IF, S_IP, T_IP, LIVE)


def start_target():
    """Listeners on the open ports, and a packet toward the scanner every
    100 ms: masscan 1.3.2 only notices its --wait is over when a packet
    arrives."""
    code = f"""
import socket, time
ls = []
for p in {OPEN_PORTS!r}:
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", p)); s.listen(4096); ls.append(s)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
print("ready", flush=True)
while True:
    u.sendto(b"x", ("{S_IP}", 9)); time.sleep(0.1)
"""
    p = subprocess.Popen(["ip", "netns", "exec", TARGET, sys.executable, "-c", code],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    return p


timed = NET.timed


def parse_portfleet(stdout, _):
    return {tuple(line.rsplit(":", 1)) for line in stdout.split()}


def parse_masscan(_, path):
    found = set()
    for line in Path(path).read_text().splitlines():
        f = line.split()
        if len(f) >= 4 and f[0] == "open":
            found.add((f[3], f[2]))
    return found


def parse_nmap(stdout, _):
    found = set()
    for line in stdout.splitlines():
        if not line.startswith("Host:") or "Ports:" not in line:
            continue
        ip = line.split()[1]
        for entry in line.split("Ports:")[1].split(","):
            parts = entry.strip().split("/")
            if len(parts) > 2 and parts[1] == "open":
                found.add((ip, parts[0]))
    return found


def tool_cmd(tool, agent, hosts, ports, rate, router_mac, out):
    if tool == "portfleet":
        return [str(agent), "scan", hosts, "-p", ports, "--rate", str(rate), "--scan-type", "syn"], parse_portfleet
    if tool == "masscan":
        return (["masscan", hosts, f"-p{ports}", "--rate", str(rate), "--wait", "1", "-e", S_IF,
                 "--adapter-ip", S_IP, "--router-mac", router_mac, "-oL", out], parse_masscan)
    if tool == "nmap":
        # nmap spells a range 198.18.1.1-254.
        hosts = hosts.replace("-198.18.1.", "-")
        return ["nmap", "-sS", "-T4", "-n", "-Pn", "-p", ports, "-oG", "-", hosts], parse_nmap
    raise ValueError(tool)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--full", action="store_true", help="also run (c): 254 x 65535")
    ap.add_argument("--tools", default="portfleet,masscan,nmap")
    ap.add_argument("--rate", type=int, default=1_000_000, help="portfleet probes/s (default: as fast as it goes)")
    ap.add_argument("--masscan-rate", type=int, default=1_000_000)
    ap.add_argument("--ring-sweep", action="store_true",
                    help="also run (b) with receive rings from 64 KiB to 16 MiB and report dropped replies")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: the benchmark builds network namespaces")
    ensure_tools()
    agent = build_agent()
    tools = args.tools.split(",")
    workloads = [("a", "1 x 65535", "198.18.1.1", "1-65535", 1),
                 ("b", "254 x 1000", "198.18.1.1-198.18.1.254", "1-1000", 254)]
    if args.full:
        workloads.append(("c", "254 x 65535", "198.18.1.1-198.18.1.254", "1-65535", 254))
    router_mac = NET.setup()
    target = start_target()
    results = {}
    try:
        print(f"machine: {os.cpu_count()} cpus, {sh('uname', '-r').stdout.strip()}; "
              f"{sh('masscan', '--version', check=False).stdout.splitlines()[1:2]}, "
              f"{sh('nmap', '--version').stdout.splitlines()[0]}")
        for key, label, hosts, ports, nhosts in workloads:
            lo, hi = (int(x) for x in ports.split("-"))
            nports = hi - lo + 1
            probes = nhosts * nports
            expected = {(f"198.18.1.{h}", str(p)) for h in range(1, nhosts + 1) for p in OPEN_PORTS if lo <= p <= hi}
            if nhosts == 1:
                expected = {("198.18.1.1", str(p)) for p in OPEN_PORTS if lo <= p <= hi}
            for tool in tools:
                if tool == "nmap" and key == "c":
                    continue  # minutes per run; (a) and (b) show its pace
                runs = []
                for _ in range(args.runs if key != "c" else max(1, args.runs // 3)):
                    with tempfile.NamedTemporaryFile(suffix=".txt") as out:
                        rate = args.rate if tool == "portfleet" else args.masscan_rate
                        cmd, parse = tool_cmd(tool, agent, hosts, ports, rate, router_mac, out.name)
                        stdout, stderr, wall, cpu, rss = timed(cmd)
                        found = parse(stdout, out.name)
                    runs.append((wall, cpu, rss, len(found & expected), len(found - expected)))
                    print(f"  ({key}) {tool:9} {wall:6.2f}s cpu {cpu:5.2f}s rss {rss/1024:6.1f}MB "
                          f"found {len(found & expected)}/{len(expected)} extra {len(found - expected)}",
                          file=sys.stderr)
                    if tool == "portfleet":
                        print("      " + stderr.strip().splitlines()[-1], file=sys.stderr)
                med = lambda i: statistics.median(r[i] for r in runs)
                results[(key, tool)] = dict(wall=med(0), pps=probes / med(0), cpu=med(1), rss=med(2) / 1024,
                                            found=min(r[3] for r in runs), extra=max(r[4] for r in runs),
                                            expected=len(expected), label=label, runs=len(runs))
        if args.ring_sweep and "portfleet" in tools:
            sweep = []
            expected = {(f"198.18.1.{h}", str(p)) for h in range(1, 255) for p in OPEN_PORTS}
            for kb in (64, 256, 1024, 4096, 16384):
                stdout, stderr, wall, cpu, rss = timed([str(agent), "scan", "198.18.1.1-198.18.1.254", "-p", "1-1000",
                                                        "--rate", str(args.rate), "--recv-ring-kb", str(kb),
                                                        "--retries", "0", "--wait", "300"])
                summary = stderr.strip().splitlines()[-1]
                dropped = int(summary.split(" replies dropped")[0].rsplit(" ", 1)[1])
                closed = int(summary.split(" closed")[0].rsplit(" ", 1)[1])
                found = len(parse_portfleet(stdout, None) & expected)
                sweep.append((kb, dropped, closed, found, rss / 1024))
                print(f"  ring {kb:6} KiB: {dropped} dropped, {closed} closed, {found}/{len(expected)} open found",
                      file=sys.stderr)
    finally:
        target.kill()
        NET.teardown()

    print(f"\n| work | tool | wall s | probes/s | CPU s | peak RSS MB | found/expected | runs |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for (key, tool), r in results.items():
        extra = f" (+{r['extra']} extra)" if r["extra"] else ""
        print(f"| ({key}) {r['label']} | {tool} | {r['wall']:.2f} | {r['pps']:,.0f} | {r['cpu']:.2f} | "
              f"{r['rss']:.1f} | {r['found']}/{r['expected']}{extra} | {r['runs']} |")
    if args.ring_sweep and "portfleet" in tools:
        print("\n| receive ring | replies dropped | closed seen (of 251,968) | open found (of 2032) | peak RSS MB |")
        print("|---:|---:|---:|---:|---:|")
        for kb, dropped, closed, found, rss in sweep:
            print(f"| {kb} KiB | {dropped:,} | {closed:,} | {found} | {rss:.1f} |")
    print()
    for key in sorted({k for k, _ in results}):
        pf = results.get((key, "portfleet"))
        for peer in ("masscan", "nmap"):
            other = results.get((key, peer))
            if pf and other:
                print(f"({key}) wall time portfleet/{peer}: {pf['wall'] / other['wall']:.2f}")


if __name__ == "__main__":
    main()
