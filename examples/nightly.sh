#!/bin/sh
# A nightly job over one server: price the day's file, run it, run again the lines that failed
# for reasons of their own (the engine, the window), and keep one merged result.
#
#   examples/nightly.sh IN.jsonl OUT.parquet|OUT.jsonl
#
# TOKABATCH names the tokabatch command (cron: the full path in the clone's .venv); OPENAI_BASE_URL
# the server. The exit code is submit's (docs/cli.md), or the retry's when there was one.
set -u
tb=${TOKABATCH:-tokabatch}
in=$1
out=$2
# Lines, prompt tokens, expected output tokens, prefix sharing, estimated duration; exit 4 (and
# the first errors with their line numbers) when the file would fail validation.
"$tb" submit "$in" --dry-run || exit $?
id=$("$tb" submit "$in" --wait -o "$out")
code=$?
if [ "$code" = 3 ] || [ "$code" = 5 ]; then      # some lines failed, or the window ended first
    "$tb" retry "$id" --wait -o "$out"            # -o: the batch's and the retry's results merged
    code=$?
fi
exit "$code"
