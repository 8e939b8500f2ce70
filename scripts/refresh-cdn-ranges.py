#!/usr/bin/env python3
"""Refreshes core/data/cdn-ranges.txt from the CDN and WAF providers' own
published IP range lists (stdlib only), or checks a file's format.

    scripts/refresh-cdn-ranges.py               # fetch all, rewrite the file
    scripts/refresh-cdn-ranges.py -o OUT        # fetch all, write OUT instead
    scripts/refresh-cdn-ranges.py --check FILE  # validate FILE, no network

The file is read by core/src/cdn.rs. Format: "#" lines are comments; the
header holds one "# date: YYYY-MM-DD" line and, per provider, one or more
"# source: <provider> <where from>" lines; then one "<provider> <cidr>" line
per range, sorted by provider, address family, address and prefix length,
without duplicates.

Nothing is written unless every source answers with at least one range and
every range is a valid CIDR: a half-refreshed file would silently drop a
provider from the scanner's CDN detection.
"""

import argparse
import datetime
import io
import ipaddress
import json
import os
import re
import sys
import tempfile
import urllib.parse
import urllib.request
import zipfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUTPUT = os.path.join(REPO, "core", "data", "cdn-ranges.txt")
TIMEOUT = 60
USER_AGENT = "portfleet-refresh-cdn-ranges/1"

PROVIDER_RE = re.compile(r"^[a-z0-9][a-z0-9-]*$")
LINE_RE = re.compile(r"^(\S+) (\S+)$")
DATE_RE = re.compile(r"^# date: (\d{4}-\d{2}-\d{2})$")
SOURCE_RE = re.compile(r"^# source: (\S+) (\S.*)$")

CLOUDFLARE_V4 = "https://www.cloudflare.com/ips-v4"
CLOUDFLARE_V6 = "https://www.cloudflare.com/ips-v6"
FASTLY = "https://api.fastly.com/public-ip-list"
AWS = "https://ip-ranges.amazonaws.com/ip-ranges.json"
AKAMAI = "https://techdocs.akamai.com/property-manager/pdfs/akamai_ipv4_ipv6_CIDRs-txt.zip"
IMPERVA = "https://my.imperva.com/api/integration/v1/ips"
# Microsoft renames the service-tags file every week; its download page links
# the current one.
AZURE_PAGE = "https://www.microsoft.com/en-us/download/details.aspx?id=56519"
AZURE_JSON_RE = re.compile(r"https://download\.microsoft\.com/download/[^\"'\s<>]*?ServiceTags_Public_\d+\.json")
# Sucuri publishes no machine-readable list: take projectdiscovery/cdncheck's
# (the data naabu's -exclude-cdn uses).
CDNCHECK = "https://raw.githubusercontent.com/projectdiscovery/cdncheck/main/sources_data.json"


class SourceError(Exception):
    pass


def fetch(url, data=None):
    req = urllib.request.Request(url, data=data, headers={"User-Agent": USER_AGENT})
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as resp:
            body = resp.read()
    except Exception as e:  # urllib raises several unrelated types
        raise SourceError(f"{url}: {e}") from e
    if not body:
        raise SourceError(f"{url}: empty response")
    return body


def fetch_json(url, data=None):
    body = fetch(url, data)
    try:
        return json.loads(body)
    except ValueError as e:
        raise SourceError(f"{url}: not JSON: {e}") from e


def text_lines(body, url):
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SourceError(f"{url}: not UTF-8 text: {e}") from e
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def strings(value, what):
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise SourceError(f"{what}: expected a list of strings")
    return value


def cloudflare():
    cidrs = []
    for url in (CLOUDFLARE_V4, CLOUDFLARE_V6):
        cidrs += text_lines(fetch(url), url)
    return [CLOUDFLARE_V4, CLOUDFLARE_V6], cidrs


def fastly():
    doc = fetch_json(FASTLY)
    cidrs = strings(doc.get("addresses"), f"{FASTLY} addresses") + strings(
        doc.get("ipv6_addresses", []), f"{FASTLY} ipv6_addresses"
    )
    return [FASTLY], cidrs


def cloudfront():
    # Only service CLOUDFRONT: the edges. CLOUDFRONT_ORIGIN_FACING is where
    # CloudFront fetches from origins, and the rest of AWS is not a CDN.
    doc = fetch_json(AWS)
    cidrs = [p["ip_prefix"] for p in doc.get("prefixes", []) if p.get("service") == "CLOUDFRONT"]
    cidrs += [p["ipv6_prefix"] for p in doc.get("ipv6_prefixes", []) if p.get("service") == "CLOUDFRONT"]
    return [f"{AWS} (service CLOUDFRONT, syncToken {doc.get('syncToken', '?')})"], cidrs


def akamai():
    body = fetch(AKAMAI)
    try:
        archive = zipfile.ZipFile(io.BytesIO(body))
        names = [n for n in archive.namelist() if n.endswith(".txt") and not n.startswith("__MACOSX/")]
        cidrs = []
        for name in names:
            cidrs += text_lines(archive.read(name), f"{AKAMAI} {name}")
    except zipfile.BadZipFile as e:
        raise SourceError(f"{AKAMAI}: {e}") from e
    if not names:
        raise SourceError(f"{AKAMAI}: no .txt file in the archive")
    return [f"{AKAMAI} ({', '.join(sorted(names))})"], cidrs


def imperva():
    doc = fetch_json(IMPERVA, urllib.parse.urlencode({"resp_format": "json"}).encode())
    cidrs = strings(doc.get("ipRanges"), f"{IMPERVA} ipRanges") + strings(
        doc.get("ipv6Ranges", []), f"{IMPERVA} ipv6Ranges"
    )
    return [f"{IMPERVA} (POST resp_format=json)"], cidrs


def sucuri():
    doc = fetch_json(CDNCHECK)
    cidrs = strings((doc.get("waf") or {}).get("sucuri"), f"{CDNCHECK} waf.sucuri")
    return [f"{CDNCHECK} (waf.sucuri; Sucuri publishes no machine-readable list)"], cidrs


def azure_frontdoor():
    page = fetch(AZURE_PAGE).decode("utf-8", "replace")
    match = AZURE_JSON_RE.search(page)
    if not match:
        raise SourceError(f"{AZURE_PAGE}: no ServiceTags_Public_*.json link on the page")
    url = match.group(0)
    doc = fetch_json(url)
    tags = [v for v in doc.get("values", []) if v.get("name") == "AzureFrontDoor.Frontend"]
    if not tags:
        raise SourceError(f"{url}: no AzureFrontDoor.Frontend service tag")
    cidrs = strings(tags[0].get("properties", {}).get("addressPrefixes"), f"{url} AzureFrontDoor.Frontend")
    return [f"{url} (service tag AzureFrontDoor.Frontend, via {AZURE_PAGE})"], cidrs


PROVIDERS = {
    "akamai": akamai,
    "azure-frontdoor": azure_frontdoor,
    "cloudflare": cloudflare,
    "cloudfront": cloudfront,
    "fastly": fastly,
    "imperva": imperva,
    "sucuri": sucuri,
}


def network(cidr):
    """The CIDR as a network; raises ValueError unless it is a valid network
    address (no host bits set)."""
    return ipaddress.ip_network(cidr, strict=True)


def sort_key(item):
    provider, net = item
    return (provider, net.version, int(net.network_address), net.prefixlen)


def render(date, sources, ranges):
    """The file's text. sources: provider -> list of strings saying where its
    ranges came from; ranges: iterable of (provider, network)."""
    lines = [
        "# CDN and WAF edge IP ranges, compiled into portfleet-core by core/src/cdn.rs.",
        '# Format: one "<provider> <cidr>" line per range, sorted by provider, family,',
        '# address and prefix length; "#" starts a comment. Refresh and check with',
        "# scripts/refresh-cdn-ranges.py (--check FILE validates without network).",
        "# Left out: Google (its only published list, goog.json, is all of Google, not",
        "# its CDN front ends) and StackPath/Highwinds (CDN discontinued, no list).",
        "# The date line is the day the ranges were taken from the sources named below.",
        f"# date: {date}",
    ]
    for provider in sorted(sources):
        lines += [f"# source: {provider} {s}" for s in sources[provider]]
    lines += [f"{p} {n}" for p, n in sorted(set(ranges), key=sort_key)]
    return "\n".join(lines) + "\n"


def check(path, quiet=False):
    """Validates a file; returns the list of problems (empty when fine)."""
    problems = []
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        return [f"{path}: {e}"]
    dates, sourced, seen, prev = [], set(), set(), None
    counts = {}
    for n, line in enumerate(text.splitlines(), 1):
        where = f"{path}:{n}"
        if line.startswith("#"):
            if m := DATE_RE.match(line):
                try:
                    datetime.date.fromisoformat(m.group(1))
                    dates.append(m.group(1))
                except ValueError:
                    problems.append(f"{where}: {m.group(1)!r} is not a date")
            elif line.startswith("# date:"):
                problems.append(f'{where}: date line must read "# date: YYYY-MM-DD"')
            elif m := SOURCE_RE.match(line):
                sourced.add(m.group(1))
            elif line.startswith("# source:"):
                problems.append(f'{where}: source line must read "# source: <provider> <where from>"')
            continue
        if not line.strip():
            problems.append(f"{where}: blank line")
            continue
        m = LINE_RE.match(line)
        if not m:
            problems.append(f'{where}: expected "<provider> <cidr>", got {line!r}')
            continue
        provider, cidr = m.groups()
        if not PROVIDER_RE.match(provider):
            problems.append(f"{where}: provider {provider!r} is not lowercase letters, digits and '-'")
            continue
        try:
            net = network(cidr)
        except ValueError as e:
            problems.append(f"{where}: {e}")
            continue
        if str(net) != cidr:
            problems.append(f"{where}: {cidr!r} is not in canonical form ({net})")
        item = (provider, net)
        if item in seen:
            problems.append(f"{where}: duplicate {provider} {net}")
        elif prev is not None and sort_key(item) < sort_key(prev):
            problems.append(f"{where}: {provider} {net} is out of order (after {prev[0]} {prev[1]})")
        seen.add(item)
        prev = item
        counts[provider] = counts.get(provider, 0) + 1
    if len(dates) != 1:
        problems.append(f'{path}: needs exactly one "# date: YYYY-MM-DD" line, found {len(dates)}')
    for provider in sorted(set(counts) - sourced):
        problems.append(f"{path}: provider {provider} has no '# source: {provider} ...' line")
    for provider in sorted(sourced - set(counts)):
        problems.append(f"{path}: source line for {provider}, which has no ranges")
    if not counts:
        problems.append(f"{path}: no ranges")
    if not problems and not quiet:
        summary = ", ".join(f"{p} {c}" for p, c in sorted(counts.items()))
        print(f"{path}: ok, {sum(counts.values())} ranges ({summary}), date {dates[0]}")
    return problems


def refresh(output):
    sources, ranges, failures = {}, [], []
    for provider, get in PROVIDERS.items():
        try:
            where, cidrs = get()
            if not cidrs:
                raise SourceError("returned no ranges")
            nets = []
            for cidr in cidrs:
                try:
                    nets.append(network(cidr.strip()))
                except ValueError as e:
                    raise SourceError(f"invalid range {cidr!r}: {e}") from e
        except (SourceError, KeyError, TypeError, AttributeError) as e:
            failures.append(f"{provider}: {e}")
            continue
        sources[provider] = where
        ranges += [(provider, n) for n in nets]
        print(f"{provider}: {len(nets)} ranges", file=sys.stderr)
    if failures:
        print(f"refusing to write {output}; these sources failed:", file=sys.stderr)
        for f in failures:
            print(f"  {f}", file=sys.stderr)
        return 1
    text = render(datetime.date.today().isoformat(), sources, ranges)
    # Write beside the target, then rename: readers never see half a file.
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(output)), prefix=".cdn-ranges.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600
        problems = check(tmp, quiet=True)
        if problems:
            print("\n".join(problems), file=sys.stderr)
            return 1
        os.replace(tmp, output)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    print(f"wrote {output}", file=sys.stderr)
    return 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--check", metavar="FILE", help="validate FILE's format and ranges; no network")
    group.add_argument("-o", "--output", default=DEFAULT_OUTPUT, help="file to write (default: %(default)s)")
    args = parser.parse_args()
    if args.check:
        problems = check(args.check)
        if problems:
            print("\n".join(problems), file=sys.stderr)
            return 1
        return 0
    return refresh(args.output)


if __name__ == "__main__":
    sys.exit(main())
