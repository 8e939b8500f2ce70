#!/usr/bin/env python3
"""Identification benchmark: portfleet-agent -sV against nmap -sV, same open
ports, same run.

    sudo bench/identify_bench.py              # (a), (b), (c), 3 runs each
    sudo bench/identify_bench.py --runs 5 --skip c

Builds two network namespaces joined by a veth pair (no default route:
nothing can leave them). The target namespace answers for all of
198.18.1.0/24 and runs real daemons from Debian's packages on 0.0.0.0, so
every address has the same services: nginx (HTTP, and HTTPS with a
certificate made here), OpenSSH, vsftpd, Redis, memcached, Mosquitto and
NATS.

    (a) 32 hosts x 8 service ports (256 services): wall time of
        portfleet -sV (built-in rules; and with nmap's database) and of
        nmap -sV on the same ports, and how often portfleet names the
        service as nmap does (nmap's name and tunnel; nmap is the
        reference).
    (b) 254 hosts x ports 1-1000 (1016 open): discovery rate (the engine's
        own probes/s) with identification on and off.
    (c) 254 hosts x 40 service ports (10,160 services): identification
        throughput (services/s) and peak RSS, portfleet alone (nmap -sV
        would take the better part of an hour).

Prints medians and ratios. Needs root; installs nmap, the daemons, ethtool,
openssl and time from Debian's packages when missing. Probes only the
addresses inside the namespaces it creates.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

from netbench import Net, sh

ROOT = Path(__file__).resolve().parent.parent
SCANNER, TARGET = "pfid-s", "pfid-t"
S_IF, T_IF = "pfid0", "pfid1"
S_IP, T_IP = "198.19.1.1", "198.19.1.2"
LIVE = "198.18.1.0/24"
PACKAGES = {"nmap": "nmap", "nginx": "nginx-light", "sshd": "openssh-server", "vsftpd": "vsftpd",
            "redis-server": "redis-server", "memcached": "memcached", "mosquitto": "mosquitto",
            "nats-server": "nats-server", "ethtool": "ethtool", "openssl": "openssl"}
SERVICE_PORTS = [21, 22, 80, 443, 1883, 4222, 6379, 11211]
# (c): 20 more HTTP, 8 more HTTPS and 4 more SSH ports beside the 8.
EXTRA_HTTP = list(range(8000, 8020))
EXTRA_HTTPS = list(range(8440, 8448))
EXTRA_SSH = [2200, 2201, 2202, 2203]
MANY_PORTS = SERVICE_PORTS + EXTRA_HTTP + EXTRA_HTTPS + EXTRA_SSH


def which(cmd):
    return shutil.which(cmd) or next((p for p in (f"/usr/sbin/{cmd}", f"/usr/bin/{cmd}") if Path(p).exists()), None)


def ensure_tools():
    missing = sorted({pkg for cmd, pkg in PACKAGES.items() if which(cmd) is None})
    if not Path("/usr/bin/time").exists():
        missing.append("time")
    if missing:
        print(f"installing {' '.join(missing)} ...", file=sys.stderr)
        # Debian starts a daemon it installs; these run in the namespace.
        policy = Path("/usr/sbin/policy-rc.d")
        made = not policy.exists()
        if made:
            policy.write_text("#!/bin/sh\nexit 101\n")
            policy.chmod(0o755)
        try:
            env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
            subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing], check=True, env=env)
        finally:
            if made:
                policy.unlink()


def build_agent():
    print("building portfleet-agent (release) ...", file=sys.stderr)
    subprocess.run(["cargo", "build", "--release", "-p", "portfleet-agent"], cwd=ROOT, check=True)
    return ROOT / "target" / "release" / "portfleet-agent"


NET = Net(SCANNER, TARGET, S_IF, T_IF, S_IP, T_IP, LIVE)


def setup():
    NET.setup()
    # Thousands of identification connections in a few seconds.
    for ns in (SCANNER, TARGET):
        sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1", check=False)
        sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65000", check=False)
        sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.core.somaxconn=4096", check=False)


def start_daemons(d: Path):
    """The services, in the foreground in the target namespace."""
    d.joinpath("www").mkdir()
    d.joinpath("www/index.html").write_text("<html><head><title>portfleet bench</title></head></html>")
    d.joinpath("tmp").mkdir()
    d.joinpath("empty").mkdir()
    sh("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30", "-subj", "/CN=bench.test",
       "-keyout", str(d / "web.key"), "-out", str(d / "web.crt"))
    listens = "".join(f"listen {p} reuseport backlog=4096;" for p in [80] + EXTRA_HTTP)
    listens += "".join(f"listen {p} ssl reuseport backlog=4096;" for p in [443] + EXTRA_HTTPS)
    d.joinpath("nginx.conf").write_text(f"""
daemon off; master_process on; worker_processes 2; user root; pid {d}/nginx.pid; error_log {d}/nginx.err;
events {{ worker_connections 8192; }}
http {{ access_log off; client_body_temp_path {d}/tmp; proxy_temp_path {d}/tmp; fastcgi_temp_path {d}/tmp;
  uwsgi_temp_path {d}/tmp; scgi_temp_path {d}/tmp;
  server {{ {listens} ssl_certificate {d}/web.crt; ssl_certificate_key {d}/web.key; root {d}/www; }} }}
""")
    sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "hostkey"))
    Path("/run/sshd").mkdir(exist_ok=True)
    d.joinpath("vsftpd.conf").write_text(
        f"listen=YES\nlisten_ipv6=NO\nbackground=NO\nanonymous_enable=YES\nno_anon_password=YES\n"
        f"anon_root={d}/empty\nlocal_enable=NO\nsecure_chroot_dir={d}/empty\nrun_as_launching_user=YES\n"
        f"max_clients=0\nmax_per_ip=0\n")
    d.joinpath("mosquitto.conf").write_text("listener 1883 0.0.0.0\nallow_anonymous true\nmax_connections -1\n")
    sshd = [which("sshd"), "-D", "-e", "-f", "/dev/null", "-h", str(d / "hostkey"), "-o", "PidFile=none",
            "-o", "MaxStartups=4000", "-o", "LoginGraceTime=5"]
    for p in [22] + EXTRA_SSH:
        sshd += ["-o", f"ListenAddress=0.0.0.0:{p}"]
    cmds = [
        [which("nginx"), "-c", str(d / "nginx.conf"), "-p", str(d)],
        sshd,
        [which("vsftpd"), str(d / "vsftpd.conf")],
        [which("redis-server"), "--bind", "0.0.0.0", "--port", "6379", "--save", "", "--appendonly", "no",
         "--protected-mode", "no", "--maxclients", "10000", "--dir", str(d)],
        [which("memcached"), "-u", "root", "-l", "0.0.0.0", "-p", "11211", "-U", "0", "-c", "8192"],
        [which("mosquitto"), "-c", str(d / "mosquitto.conf")],
        [which("nats-server"), "-a", "0.0.0.0", "-p", "4222"],
    ]
    # The target namespace stands in for other machines: its daemons run
    # at the lowest CPU priority, so what they cost on this shared box is
    # not taken from the scanner.
    procs = [subprocess.Popen(["ip", "netns", "exec", TARGET, "nice", "-n", "19"] + c, stdout=subprocess.DEVNULL,
                              stderr=open(d / f"{Path(c[0]).name}.log", "w")) for c in cmds]
    # Every port answers before the first run.
    code = f"""
import socket, time, sys
deadline = time.time() + 20
for p in {MANY_PORTS!r}:
    while True:
        try:
            socket.create_connection(("198.18.1.1", p), timeout=1).close(); break
        except OSError:
            if time.time() > deadline: sys.exit(f"port {{p}} never opened")
            time.sleep(0.1)
"""
    sh("ip", "netns", "exec", TARGET, sys.executable, "-c", code)
    return procs


timed = NET.timed


def normal(name, tunnel):
    """nmap's XML says http + tunnel ssl where portfleet says https."""
    if name == "https" and tunnel == "ssl":
        name = "http"
    return (tunnel or "", name or "")


def portfleet_services(stdout):
    out = {}
    for line in stdout.splitlines():
        v = json.loads(line)
        out[(v["ip"], v["port"])] = normal(v.get("name", ""), v.get("tunnel", ""))
    return out


def nmap_services(path):
    """(ip, port) -> (tunnel, name), and the ports whose name nmap's probe
    database gave (not its port table, not a version script's text)."""
    out, probed = {}, set()
    for host in ET.parse(path).getroot().iter("host"):
        ip = host.find("address").get("addr")
        for port in host.iter("port"):
            if port.find("state").get("state") != "open":
                continue
            s = port.find("service")
            name, tunnel = (s.get("name"), s.get("tunnel")) if s is not None else ("", "")
            key = (ip, int(port.get("portid")))
            out[key] = normal(name, tunnel)
            if s is not None and s.get("method") == "probed" and " " not in (name or ""):
                probed.add(key)
    return out, probed


def engine_rate(stderr):
    """probes/s from the agent's summary line ("N probes (...) in Xs, R probes/s: ...")."""
    line = next(l for l in reversed(stderr.splitlines()) if " probes/s" in l)
    return float(line.split(" probes/s")[0].rsplit(" ", 1)[1].replace(",", ""))


def hosts(n):
    return f"198.18.1.1-198.18.1.{n}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--skip", default="", help="workloads to leave out, e.g. c or b,c")
    ap.add_argument("--rate", type=int, default=1_000_000, help="portfleet probes/s in (a) and (c)")
    ap.add_argument("--discovery-rate", type=int, default=100_000, help="the requested rate of (b)'s first part")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: the benchmark builds network namespaces")
    skip = set(args.skip.split(",")) - {""}
    ensure_tools()
    agent = str(build_agent())
    nmap_db = "/usr/share/nmap/nmap-service-probes"
    setup()
    tmp = tempfile.TemporaryDirectory()
    procs = start_daemons(Path(tmp.name))
    rows, lines = {}, []
    med = statistics.median
    try:
        print(f"machine: {os.cpu_count()} cpus, {sh('uname', '-r').stdout.strip()}; "
              f"{sh('nmap', '--version').stdout.splitlines()[0]}", file=sys.stderr)
        if "a" not in skip:
            ports = ",".join(map(str, SERVICE_PORTS))
            expected = 32 * len(SERVICE_PORTS)
            runs = {"portfleet (built-in)": [], "portfleet (nmap db)": [], "nmap -sV": []}
            agree = {"portfleet (built-in)": [], "portfleet (nmap db)": []}
            agree_probed = {"portfleet (built-in)": [], "portfleet (nmap db)": []}
            for i in range(args.runs):
                with tempfile.NamedTemporaryFile(suffix=".xml") as x:
                    # nmap spells a range 198.18.1.1-32.
                    _, _, wall, cpu, rss = timed(["nmap", "-sS", "-sV", "-T4", "-n", "-Pn", "-p", ports,
                                                   "-oX", x.name, "198.18.1.1-32"])
                    reference, probed = nmap_services(x.name)
                runs["nmap -sV"].append((wall, cpu, rss, len(reference)))
                for label, db in (("portfleet (built-in)", "none"), ("portfleet (nmap db)", nmap_db)):
                    out, err, wall, cpu, rss = timed([agent, "scan", hosts(32), "-p", ports, "--rate", str(args.rate),
                                                      "-sV", "--json", "--nmap-service-probes", db])
                    ours = portfleet_services(out)
                    same = sum(1 for k, v in reference.items() if ours.get(k) == v)
                    agree[label].append(same / max(1, len(reference)))
                    same_probed = sum(1 for k in probed if ours.get(k) == reference[k])
                    agree_probed[label].append(same_probed / max(1, len(probed)))
                    runs[label].append((wall, cpu, rss, len(ours)))
                    if i == 0:
                        differ = sorted({(reference[k], ours.get(k)) for k in reference if ours.get(k) != reference[k]})
                        for theirs, mine in differ:
                            print(f"  (a) {label}: nmap says {theirs}, portfleet {mine}", file=sys.stderr)
                print(f"  (a) run {i + 1}: " + ", ".join(f"{k} {v[-1][0]:.2f}s" for k, v in runs.items()),
                      file=sys.stderr)
            nmap_wall = med(r[0] for r in runs["nmap -sV"])
            for label, rs in runs.items():
                wall = med(r[0] for r in rs)
                rows[("a", label)] = dict(
                    wall=wall, cpu=med(r[1] for r in rs), rss=med(r[2] for r in rs) / 1024,
                    found=f"{min(r[3] for r in rs)}/{expected}", sps=expected / wall,
                    agree=f"{100 * med(agree[label]):.1f}%" if label in agree else "reference",
                    agree_probed=f"{100 * med(agree_probed[label]):.1f}%" if label in agree else "reference",
                    ratio=wall / nmap_wall)
        if "b" not in skip:
            # At a rate a scan asks for, and flat out (where, on this 2-core
            # box, identification's connections - and the target daemons
            # answering them - take CPU the send threads would use).
            for rate in (args.discovery_rate, 1_000_000):
                on, off = [], []
                for i in range(args.runs):
                    for extra, sink in (([], off), (["-sV", "--nmap-service-probes", "none"], on)):
                        _, err, wall, cpu, rss = timed([agent, "scan", hosts(254), "-p", "1-1000", "--rate",
                                                        str(rate)] + extra)
                        sink.append((engine_rate(err), wall, rss))
                    print(f"  (b) --rate {rate} run {i + 1}: discovery {off[-1][0]:,.0f} probes/s off, "
                          f"{on[-1][0]:,.0f} on", file=sys.stderr)
                r_on, r_off = med(r[0] for r in on), med(r[0] for r in off)
                lines.append(f"(b) --rate {rate:,}: discovery with identification on/off {r_on:,.0f} / {r_off:,.0f} "
                             f"probes/s = {r_on / r_off:.2f}x (wall {med(r[1] for r in on):.2f}s / "
                             f"{med(r[1] for r in off):.2f}s; peak RSS {med(r[2] for r in on) / 1024:.1f} / "
                             f"{med(r[2] for r in off) / 1024:.1f} MB)")
        if "c" not in skip:
            ports = ",".join(map(str, MANY_PORTS))
            expected = 254 * len(MANY_PORTS)
            for label, db in (("built-in rules", "none"), ("nmap's database", nmap_db)):
                rs = []
                for i in range(args.runs):
                    out, err, wall, cpu, rss = timed([agent, "scan", hosts(254), "-p", ports, "--rate", str(args.rate),
                                                      "-sV", "--json", "--nmap-service-probes", db])
                    found = portfleet_services(out)
                    named = sum(1 for v in found.values() if v[1] not in ("", "unknown"))
                    rs.append((wall, cpu, rss, len(found), named))
                    print(f"  (c) {label} run {i + 1}: {len(found)} services in {wall:.2f}s, {named} named, "
                          f"rss {rss / 1024:.1f} MB", file=sys.stderr)
                wall = med(r[0] for r in rs)
                lines.append(f"(c) {expected} services, {label}: {med(r[3] for r in rs):.0f} found, "
                             f"{med(r[4] for r in rs):.0f} named, {wall:.2f}s wall = {expected / wall:,.0f} services/s, "
                             f"CPU {med(r[1] for r in rs):.2f}s, peak RSS {med(r[2] for r in rs) / 1024:.1f} MB")
    finally:
        for p in procs:
            p.kill()
        NET.teardown()
        tmp.cleanup()

    if rows:
        print("\n| work | tool | wall s | services/s | CPU s | peak RSS MB | found | names as nmap's: all "
              "| where nmap's probes named it | wall / nmap's |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for (key, label), r in rows.items():
            print(f"| ({key}) 32 x 8 | {label} | {r['wall']:.2f} | {r['sps']:,.0f} | {r['cpu']:.2f} | "
                  f"{r['rss']:.1f} | {r['found']} | {r['agree']} | {r['agree_probed']} | {r['ratio']:.2f} |")
    print()
    for line in lines:
        print(line)


if __name__ == "__main__":
    main()
