#!/usr/bin/env bash
# The evaluation corpus (issue: quality vs bits), rebuilt offline from a registry package:
# two public-domain English texts of the Canterbury corpus, shipped in the source
# distribution of Brotli 1.1.0 on PyPI (tests/testdata/). See data/README.md.
#   data/corpus/alice.txt        Lewis Carroll, Alice's Adventures in Wonderland (Millennium Fulcrum Edition 2.9)
#   data/corpus/loc-workshop.txt Library of Congress, Workshop on Electronic Texts, Proceedings (1992), body only
set -euo pipefail
cd "$(dirname "$0")/.."
dest=data/corpus
if [ -s "$dest/alice.txt" ] && [ -s "$dest/loc-workshop.txt" ]; then
  echo "corpus: already in $dest"; exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --no-binary :all: --dest "$tmp" Brotli==1.1.0
tar -xzf "$tmp"/Brotli-1.1.0.tar.gz -C "$tmp" Brotli-1.1.0/tests/testdata/alice29.txt Brotli-1.1.0/tests/testdata/lcet10.txt
src="$tmp/Brotli-1.1.0/tests/testdata"
( cd "$src" && sha256sum -c --quiet <<'SUMS'
7467306ee0feed4971260f3c87421154a05be571d944e9cb021a5713700c38f0  alice29.txt
5314ba1dbb03f471df88bec6cd120a938ef60d0fd3511c5c1dce61bf7463245f  lcet10.txt
SUMS
)
mkdir -p "$dest"
cp "$src/alice29.txt" "$dest/alice.txt"
# lcet10.txt: Project Gutenberg's header and table of contents end at line 130, its
# footer starts at line 7518; the proceedings themselves lie between.
sed -n '131,7517p' "$src/lcet10.txt" > "$dest/loc-workshop.txt"
wc -w "$dest"/*.txt
