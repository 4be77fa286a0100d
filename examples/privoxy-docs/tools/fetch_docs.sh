#!/usr/bin/env bash
# Privoxy's manuals (user manual, FAQ, man page: 24 HTML pages) from Debian's `privoxy` package into docs/: a real
# documentation set that no one here wrote, for tailor's tests, benchmarks and tutorial. The package is only
# unpacked, never installed. The questions in qa/ were written against version 3.0.34.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
docs="$here/docs"
[ -f "$docs/user-manual/config.html" ] && exit 0
command -v apt-get >/dev/null || { echo "error: fetching the Privoxy manuals needs apt-get (Debian/Ubuntu)"; exit 1; }
SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp" "$docs.tmp"' EXIT
chmod 755 "$tmp"
cd "$tmp"
# a fresh machine has no package lists yet: update once, then download
apt-get download privoxy >/dev/null 2>&1 || { $SUDO apt-get update -qq && apt-get download privoxy >/dev/null; }
dpkg-deb -x privoxy_*.deb unpacked
mkdir -p "$docs.tmp"
for part in user-manual faq man-page; do
  mkdir -p "$docs.tmp/$part"
  cp unpacked/usr/share/doc/privoxy/$part/*.html "$docs.tmp/$part/"
done
dpkg-deb -f privoxy_*.deb Version > "$docs.tmp/VERSION"
mv "$docs.tmp" "$docs"
echo "Privoxy manuals $(cat "$docs/VERSION"): $(find "$docs" -name '*.html' | wc -l) pages in $docs"
