#!/usr/bin/env bash
# tests/fullsize/dawn.mjs, tried again if dawn.node dies by a signal (it has been seen to die at
# start on a GPU machine), at most three times; any other failure is returned as it is. NODE: the
# Node binary (default: node on the PATH).
set -u
cd "$(dirname "$0")/../.."
for try in 1 2 3; do
  "${NODE:-node}" tests/fullsize/dawn.mjs "$@"
  rc=$?
  [ $rc -le 128 ] && exit $rc
  echo "dawn.node died (exit $rc), try $try" >&2
done
exit $rc
