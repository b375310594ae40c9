#!/usr/bin/env bash
# The device tool sends at most 64 MiB of working tree (tracked files, untracked ones that are not
# ignored, carried paths). The tracked test fixtures are 46 MB, of which a GPU run needs about 7.5 MB
# (tokenizers, configs, images): `slim.sh on` takes the rest out of the working tree with git's
# sparse checkout (the index and commits are unchanged: nothing can be committed as deleted), so
# that the CLI, Node, dawn.node and the wasm engine fit beside it; `slim.sh off` brings them back.
# `slim.sh size` prints what would travel.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
size() {
  local files
  files=$( { git ls-files -z; git ls-files -o --exclude-standard -z; } | xargs -0 -r stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}' || true)
  local carried=0 p
  for p in "$@"; do [ -e "$p" ] && carried=$((carried + $(du -sb "$p" | cut -f1))); done
  echo "what would travel: $((files >> 20)) MiB of tracked and untracked files + $((carried >> 20)) MiB carried${*:+ ($*)} = $(((files + carried) >> 20)) MiB (the limit is 64)"
}
case "${1:-}" in
  on)
    # (Files whose index stat is stale would be "not up to date" and left in place.)
    git update-index -q --refresh || true
    git sparse-checkout set --no-cone '/*' '!/tests/fixtures/torch-bin/' '!/tests/fixtures/goldens/' \
      '!/tests/fixtures/tiny-unet-linear/' '!/tests/fixtures/**/*.safetensors'
    size "${@:2}" ;;
  off) git sparse-checkout disable ;;
  size) size "${@:2}" ;;
  *) sed -n '2,7p' "$0"; exit 2 ;;
esac
