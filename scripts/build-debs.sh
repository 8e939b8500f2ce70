#!/usr/bin/env bash
# Builds the Debian packages of the controller, the agent and the CLI with
# cargo-deb, then installs them into a scratch root with the real dpkg and
# checks that everything landed: binaries, units, conffiles, the portfleet
# user, directory ownership, the agent's capabilities; then removes and
# purges them there again. The host's own system is not touched (dpkg
# --root with --force-script-chrootless; the maintainer scripts honour
# DPKG_ROOT). Needs root (dpkg, chown, setcap) and cargo-deb 3.x:
#   cargo install cargo-deb --locked
#
#   scripts/build-debs.sh            # release build, packages, scratch install
#   scripts/build-debs.sh --no-build # package the existing target/release binaries
#
# The packages are left in target/debian/. Not part of the test suite (the
# release build takes minutes); the deployment tests check the metadata.
set -euo pipefail
cd "$(dirname "$0")/.."

build=1
[ "${1:-}" = --no-build ] && build=""

fail() { echo "error: $*" >&2; exit 1; }
step() { echo; echo "== $*"; }
ok() { echo "  ok: $*"; }

[ "$(id -u)" = 0 ] || fail "run as root (dpkg --root, chown and setcap need it)"
command -v dpkg >/dev/null || fail "dpkg is missing (Debian or Ubuntu needed)"
cargo deb --version >/dev/null 2>&1 || fail "cargo-deb is missing: cargo install cargo-deb --locked"
echo "cargo-deb: $(cargo deb --version 2>&1 | head -n1)"

packages="portfleet-controller portfleet-agent portfleet-cli"
target_dir=$(cargo metadata --no-deps --format-version 1 | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')

if [ -n "$build" ]; then
  step "cargo build --release (the three binaries at once)"
  # shellcheck disable=SC2046
  cargo build --release --locked $(printf -- '-p %s ' $packages)
fi

step "cargo deb"
rm -f "$target_dir"/debian/*.deb
debs=()
for p in $packages; do
  out=$(cargo deb -p "$p" --no-build 2>&1) || fail "cargo deb -p $p failed:
$out"
  deb=$(tail -n1 <<<"$out")
  [ -f "$deb" ] || fail "cargo deb -p $p did not print a package path:
$out"
  debs+=("$deb")
  echo "  $deb ($(du -h "$deb" | cut -f1))"
done

step "package contents"
for deb in "${debs[@]}"; do
  echo "-- $(dpkg-deb --field "$deb" Package Version Depends | tr '\n' ' ')"
  dpkg-deb --contents "$deb" | awk '{ print "   " $1, $2, $6 }'
  conffiles=$(dpkg-deb --ctrl-tarfile "$deb" | tar -xO ./conffiles 2>/dev/null || true)
  [ -n "$conffiles" ] && echo "   conffiles: $(echo "$conffiles" | tr '\n' ' ')"
done

root=$(mktemp -d "${TMPDIR:-/tmp}/portfleet-debroot.XXXXXX")
trap 'rm -rf "$root"' EXIT
step "install into the scratch root $root"
# What a fresh system has that the maintainer scripts use: a dpkg database
# and the account files (root only).
mkdir -p "$root"/var/lib/dpkg/{info,updates,triggers} "$root"/etc "$root"/usr/bin "$root"/lib/systemd/system
: >"$root/var/lib/dpkg/status"
: >"$root/var/lib/dpkg/available"
printf 'root:x:0:0:root:/root:/bin/bash\n' >"$root/etc/passwd"
printf 'root:x:0:\n' >"$root/etc/group"
printf 'root:*:19000:0:99999:7:::\n' >"$root/etc/shadow"
printf 'root:*::\n' >"$root/etc/gshadow"
chmod 0640 "$root/etc/shadow" "$root/etc/gshadow"
[ -f /etc/login.defs ] && cp /etc/login.defs "$root/etc/login.defs"
dpkg_root=(dpkg --root="$root" --force-script-chrootless --force-depends --log=/dev/null)
"${dpkg_root[@]}" --install "${debs[@]}"

step "checks"
check() { # description, command...
  local what=$1; shift
  if "$@"; then ok "$what"; else fail "$what"; fi
}
mode_owner() { stat -c '%a %U:%G' "$1" 2>/dev/null || echo missing; }
owner_numeric() { stat -c '%a %u:%g' "$1" 2>/dev/null || echo missing; }
for p in $packages; do
  check "dpkg says $p is installed" \
    test "$(dpkg-query --root="$root" -W -f='${db:Status-Abbrev}' "$p")" = "ii "
done
for f in usr/bin/portfleet-controller usr/bin/portfleet usr/bin/portfleet-agent \
         lib/systemd/system/portfleet-controller.service lib/systemd/system/portfleet-agent.service \
         etc/portfleet/controller.toml etc/portfleet/agent.toml \
         usr/share/doc/portfleet-controller/examples/controller.env.example \
         usr/share/doc/portfleet-agent/examples/agent.env.example; do
  check "/$f landed" test -s "$root/$f"
done
for f in /etc/portfleet/controller.toml /etc/portfleet/agent.toml; do
  check "$f is a conffile" grep -q "^ $f " <(dpkg-query --root="$root" -W -f='${Conffiles}\n' portfleet-controller portfleet-agent)
done
check "the portfleet user exists" grep -q '^portfleet:x:[0-9]*:[0-9]*:.*:/var/lib/portfleet:/usr/sbin/nologin$' "$root/etc/passwd"
check "the portfleet group exists" grep -q '^portfleet:' "$root/etc/group"
uid=$(awk -F: '$1 == "portfleet" { print $3 }' "$root/etc/passwd")
gid=$(awk -F: '$1 == "portfleet" { print $4 }' "$root/etc/passwd")
check "portfleet is a system user (uid $uid < 1000)" test "$uid" -lt 1000
check "/etc/portfleet/tls is 0700 portfleet" test "$(owner_numeric "$root/etc/portfleet/tls")" = "700 $uid:$gid"
check "/var/lib/portfleet is 0750 portfleet" test "$(owner_numeric "$root/var/lib/portfleet")" = "750 $uid:$gid"
check "/usr/bin/portfleet-agent is 0754 root:portfleet" \
  test "$(owner_numeric "$root/usr/bin/portfleet-agent")" = "754 0:$gid"
caps=$(getcap "$root/usr/bin/portfleet-agent" 2>/dev/null || true)
echo "  getcap: ${caps:-none}"
check "the agent binary has cap_net_raw,cap_net_admin=ep" grep -q 'cap_net_admin,cap_net_raw=ep' <<<"$caps"
for b in portfleet-controller portfleet-agent portfleet; do
  v=$("$root/usr/bin/$b" --version 2>&1) || fail "/usr/bin/$b --version: $v"
  ok "/usr/bin/$b --version: $(head -n1 <<<"$v")"
done
if command -v systemd-analyze >/dev/null; then
  # verify wants the units' dependencies (sysinit.target, ...) in the root.
  cp -rn /lib/systemd/system/. "$root/lib/systemd/system/" 2>/dev/null || true
  out=$(systemd-analyze verify --man=no --generators=no --root="$root" \
        /lib/systemd/system/portfleet-controller.service /lib/systemd/system/portfleet-agent.service 2>&1) || true
  check "systemd-analyze verify on the installed units: ${out:-clean}" test -z "$out"
fi

step "remove and purge"
"${dpkg_root[@]}" --remove portfleet-controller portfleet-agent portfleet-cli
check "the binaries are gone" test ! -e "$root/usr/bin/portfleet-agent" -a ! -e "$root/usr/bin/portfleet-controller"
check "the conffiles stay after remove" test -s "$root/etc/portfleet/controller.toml"
"${dpkg_root[@]}" --purge portfleet-controller portfleet-agent
check "the conffiles go with purge" test ! -e "$root/etc/portfleet/controller.toml" -a ! -e "$root/etc/portfleet/agent.toml"
check "the keys' directory stays" test -d "$root/etc/portfleet/tls"

echo
echo "all checks passed; packages:"
printf '  %s\n' "${debs[@]}"
