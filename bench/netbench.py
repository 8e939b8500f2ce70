"""What the benchmarks share: two network namespaces joined by a veth pair
(TSO/GSO off, static neighbours, no default route: nothing can leave them),
the target answering for a whole block of addresses, and a command timed
in the scanner namespace with /usr/bin/time."""

import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path


def sh(*args, check=True, **kw):
    return subprocess.run(list(args), check=check, text=True, capture_output=True, **kw)


@dataclass
class Net:
    scanner: str
    target: str
    s_if: str
    t_if: str
    s_ip: str
    t_ip: str
    live: str = "198.18.1.0/24"

    def teardown(self):
        for ns in (self.scanner, self.target):
            sh("ip", "netns", "del", ns, check=False)

    def setup(self):
        """Builds the namespaces; returns the target side's MAC address."""
        self.teardown()
        for ns in (self.scanner, self.target):
            sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", self.s_if, "netns", self.scanner, "type", "veth", "peer", "name", self.t_if,
           "netns", self.target)
        for ns, dev, addr in ((self.scanner, self.s_if, self.s_ip), (self.target, self.t_if, self.t_ip)):
            sh("ip", "-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            # libpcap-based tools size their rings from the GSO size.
            sh("ip", "netns", "exec", ns, "ethtool", "-K", dev, "tso", "off", "gso", "off", check=False)
        sh("ip", "-n", self.target, "route", "add", "local", self.live, "dev", "lo")
        sh("ip", "-n", self.scanner, "route", "add", self.live, "via", self.t_ip, "dev", self.s_if)
        mac = {ns: sh("ip", "-n", ns, "-br", "link", "show", dev).stdout.split()[2]
               for ns, dev in ((self.scanner, self.s_if), (self.target, self.t_if))}
        sh("ip", "-n", self.scanner, "neigh", "replace", self.t_ip, "lladdr", mac[self.target], "dev", self.s_if,
           "nud", "permanent")
        sh("ip", "-n", self.target, "neigh", "replace", self.s_ip, "lladdr", mac[self.scanner], "dev", self.t_if,
           "nud", "permanent")
        return mac[self.target]

    def timed(self, cmd):
        """Runs cmd in the scanner namespace; returns (stdout, stderr, wall, cpu, rss_kb)."""
        with tempfile.NamedTemporaryFile("r") as tf:
            full = ["ip", "netns", "exec", self.scanner, "/usr/bin/time", "-o", tf.name, "-f", "%e %U %S %M"] + cmd
            r = subprocess.run(full, text=True, capture_output=True)
            fields = Path(tf.name).read_text().split()[-4:]
        if r.returncode != 0:
            raise RuntimeError(f"{cmd[0]} failed ({r.returncode}): {r.stderr[-800:]}")
        wall, user, sys_, rss = float(fields[0]), float(fields[1]), float(fields[2]), int(fields[3])
        return r.stdout, r.stderr, wall, user + sys_, rss
