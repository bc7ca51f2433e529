# Helpers for the IMPLEMENTS sections in 900-implements.yarn. yarn runs each step
# with bash -eu in a clean environment: DATADIR (the scenario's scratch directory),
# SRCDIR (the source tree), MATCH_N, and what --env gives.
set -o pipefail

VMDB="${VMDB:-$SRCDIR/target/debug/vmdb}"
VMDB_EXAMPLES="${VMDB_EXAMPLES:-$SRCDIR/specs}"

# Run a command in DATADIR, keeping its stdout, stderr and exit code in files there.
run_in_datadir() {
    local rc=0
    (cd "$DATADIR" && "$@") >"$DATADIR/stdout" 2>"$DATADIR/stderr" || rc=$?
    echo "$rc" >"$DATADIR/exit"
}

# Fail with a message and the command's output.
fail() {
    echo "FAILED: $*" >&2
    for f in stdout stderr; do
        if [ -e "$DATADIR/$f" ]; then
            echo "--- $f:" >&2
            tail -n 40 "$DATADIR/$f" >&2
        fi
    done
    exit 1
}

# A field of the partition table of image $1 (sfdisk -J): a Python expression over
# `t`, the "partitiontable" object.
ptable() {
    sfdisk -J "$DATADIR/$1" | python3 -c '
import json, sys
t = json.load(sys.stdin)["partitiontable"]
print(eval(sys.argv[1]))' "$2"
}

# "IMAGE?offset=BYTES" for partition $2 of image $1: e2fsprogs opens a filesystem at
# an offset in a file this way, with no loop device.
partition_at() {
    local start
    start="$(ptable "$1" "t['partitions'][$2 - 1]['start'] * t['sectorsize']")"
    echo "$DATADIR/$1?offset=$start"
}

# debugfs command $3 on partition $2 of image $1; its output on stdout.
debugfs_in() {
    debugfs -R "$3" "$(partition_at "$1" "$2")" 2>/dev/null
}

# Does the file contain the string (fixed, not a pattern)?
contains() {
    grep -qF -- "$2" "$1"
}
