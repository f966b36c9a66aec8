#!/usr/bin/env bash
# Make a secret key for DICOM pseudonyms (ingest.dicom.key_file).
#
#   scripts/dicom-key.sh FILE
#
# 32 random bytes, hex-encoded, readable by the owner only. Keep it out of the
# lake and out of git, and back it up: the same file ingested with another key
# gets another image id, patient pseudonym, UIDs and date shift.
set -euo pipefail
out="${1:?usage: scripts/dicom-key.sh FILE}"
if [ -e "$out" ]; then
  echo "dicom-key.sh: $out exists; refusing to replace a key (every pseudonym would change)" >&2
  exit 1
fi
umask 077
mkdir -p "$(dirname "$out")"
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$out"
echo "dicom-key.sh: wrote $out (owner-only); back it up" >&2
