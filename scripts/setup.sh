#!/usr/bin/env bash
# Set up oncolake on this machine: idempotent, loud on failure.
#
#   scripts/setup.sh
#
# 1. Builds a wheel cache for the pinned Python stack (conf/requirements.txt),
#    Horovod compiled from source against the pinned TensorFlow, once per pin
#    set, under $ONCOLAKE_CACHE (default ~/.cache/oncolake), outside the clone.
# 2. Creates .venv in the clone from those wheels only (no network) and
#    leaves oncolake itself out: jobs get it as the --py-files zip.
# 3. Resolves the JVM jars of conf/jvm.txt once from Maven Central into the
#    cache and links them at .cache/jars (ignored) for Spark and HDFS, and
#    compiles oncolake's own JVM classes (lib/jvm: the Delta log store that
#    makes concurrent commits to a local lake safe) into .cache/oncolake-jvm,
#    and dumps a JVM class archive (one small ingest) into .cache/jvm-classes
#    that jobs' drivers map (ONCOLAKE_CLASS_ARCHIVE=0 skips it).
# A second run with nothing changed does nothing and takes seconds.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
cache="${ONCOLAKE_CACHE:-$HOME/.cache/oncolake}"
python="${ONCOLAKE_PYTHON:-python3.11}"
step="start"
trap 'echo "setup.sh: FAILED at step: $step" >&2' ERR

log() { echo "setup.sh: $*" >&2; }

horovod_spec="$(sed -n 's/^# HOROVOD //p' conf/requirements.txt)"
export HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 \
       HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1
py_key="$(cat conf/requirements.txt | sha256sum | cut -c1-16)"
jvm_key="$(cat conf/jvm.txt | sha256sum | cut -c1-16)"
wheels="$cache/wheels/$py_key"

step="check tools"
command -v "$python" >/dev/null || { log "need $python on PATH"; exit 1; }
command -v java >/dev/null || { log "need java (17) on PATH"; exit 1; }
command -v mvn >/dev/null || { log "need mvn (Maven) on PATH"; exit 1; }

# --- 1. wheel cache ---------------------------------------------------------
if [ ! -f "$wheels/.complete" ]; then
  step="check build tools"
  for tool in g++ cmake make; do
    command -v "$tool" >/dev/null || { log "need $tool on PATH: Horovod is compiled from source"; exit 1; }
  done
  step="build wheel cache $wheels"
  log "building the wheel cache (first run for these pins: several minutes)"
  mkdir -p "$wheels"
  build="$cache/build-venv/$py_key"
  rm -rf "$build"
  "$python" -m venv "$build"
  "$build/bin/pip" install -q -U pip wheel packaging 'setuptools<70'
  step="download/build the pinned wheels"
  "$build/bin/pip" wheel -q -w "$wheels" -r conf/requirements.txt
  step="install the pinned wheels into the build venv"
  "$build/bin/pip" install -q --no-index --find-links "$wheels" -r conf/requirements.txt
  step="compile Horovod against TensorFlow ($horovod_spec)"
  "$build/bin/pip" wheel -q --no-cache-dir --no-build-isolation --no-deps \
      -w "$wheels" "${horovod_spec%%\[*}==${horovod_spec##*==}"
  step="fetch Horovod's extra dependencies"
  "$build/bin/pip" wheel -q --find-links "$wheels" -w "$wheels" \
      -c conf/requirements.txt "$horovod_spec"
  rm -rf "$build"
  touch "$wheels/.complete"
fi

# --- 2. the clone's virtual environment -------------------------------------
stamp=".venv/.oncolake-$py_key"
if [ ! -f "$stamp" ]; then
  step="create .venv from the wheel cache"
  log "creating .venv from $wheels"
  rm -rf .venv
  "$python" -m venv .venv
  # pip and wheel come from the cache when it has them; an older pip is fine, pip's own message says why not
  .venv/bin/pip install -q --no-index --find-links "$wheels" -U pip wheel 'setuptools<70' \
    || .venv/bin/pip install -q --no-index --find-links "$wheels" 'setuptools<70'
  .venv/bin/pip install -q --no-index --find-links "$wheels" \
      -r conf/requirements.txt "$horovod_spec"
  step="check the Horovod build"
  # Capture first: `horovodrun | grep -q` under pipefail fails at random when
  # grep exits early and horovodrun dies of SIGPIPE.
  check="$(.venv/bin/horovodrun --check-build 2>&1)" \
    || { log "horovodrun --check-build failed:"; echo "$check" | tail -20 >&2; exit 1; }
  if ! grep -q '\[X\] TensorFlow' <<<"$check"; then
    log "Horovod was built without TensorFlow:"; echo "$check" | grep -v '^20..-' >&2; exit 1
  fi
  touch "$stamp"
fi


# --- 3. JVM jars --------------------------------------------------------------
jars="$cache/jars/$jvm_key"
if [ ! -f "$jars/.complete" ]; then
  step="resolve JVM jars from Maven Central (conf/jvm.txt)"
  log "resolving JVM jars into $jars"
  rm -rf "$jars"
  for group in $(awk '!/^#/ && NF {print $1}' conf/jvm.txt | sort -u); do
    work="$jars/.pom-$group"
    mkdir -p "$work" "$jars/$group"
    {
      echo '<project xmlns="http://maven.apache.org/POM/4.0.0"><modelVersion>4.0.0</modelVersion>'
      echo "<groupId>oncolake</groupId><artifactId>jars-$group</artifactId><version>1</version><dependencies>"
      awk -v g="$group" '!/^#/ && $1 == g {print $2}' conf/jvm.txt | while IFS=: read -r gid aid ver cls; do
        echo "<dependency><groupId>$gid</groupId><artifactId>$aid</artifactId><version>$ver</version>"
        [ -n "${cls:-}" ] && echo "<classifier>$cls</classifier>"
        echo "</dependency>"
      done
      echo '</dependencies></project>'
    } > "$work/pom.xml"
    mvn -q -B -f "$work/pom.xml" dependency:copy-dependencies \
        -DincludeScope=runtime -DoutputDirectory="$jars/$group" \
        -Dmaven.repo.local="$cache/m2"
    rm -rf "$work"
    if [ "$group" = spark ]; then
      # What pyspark ships (Scala, Hadoop client, compression codecs) is not shipped twice.
      shipped="$(ls "$(.venv/bin/python -c 'import os, pyspark; print(os.path.dirname(pyspark.__file__))')/jars" | sed -E 's/-[0-9]+\.[0-9][^/]*\.jar$//')"
      for jar in "$jars/$group"/*.jar; do
        stem="$(basename "$jar" | sed -E 's/-[0-9]+\.[0-9][^/]*\.jar$//')"
        grep -qxF "$stem" <<<"$shipped" && rm "$jar"
      done
    fi
  done
  touch "$jars/.complete"
fi
mkdir -p .cache
ln -sfn "$jars" .cache/jars

# --- 3b. oncolake's JVM classes -----------------------------------------------
# Small (one class, seconds to build), so built in the clone, again whenever
# its source or the jars it compiles against change.
jvm_src_key="$( (cd lib/jvm && find . -name '*.java' | sort | xargs cat; echo "$jvm_key") | sha256sum | cut -c1-16)"
built=".cache/oncolake-jvm"
if [ ! -f "$built/.complete-$jvm_src_key" ]; then
  step="compile lib/jvm (javac)"
  log "compiling lib/jvm into $built"
  rm -rf "$built" && mkdir -p "$built/classes"
  pyspark_jars="$(.venv/bin/python -c 'import os, pyspark; print(os.path.dirname(pyspark.__file__))')/jars"
  javac -nowarn --release 11 -d "$built/classes" \
      -cp "$(ls "$jars"/spark/delta-storage-*.jar "$pyspark_jars"/hadoop-client-api-*.jar | tr '\n' ':')" \
      $(find lib/jvm -name '*.java' | sort)
  jar cf "$built/oncolake-jvm.jar" -C "$built/classes" .
  rm -rf "$built/classes"
  touch "$built/.complete-$jvm_src_key"
fi

# --- 3c. the JVM class archive -------------------------------------------------
# Class data sharing: one small ingest dumps the classes a job's JVM loads
# (Spark, Delta, Hadoop); every later driver maps them (lib/oncolake/session.py,
# CLASS_ARCHIVE). The JVM maps it only for the same class path, jar for jar
# (path, size, time): keyed by the JDK, the pins, this clone and its venv's
# jars. ONCOLAKE_CLASS_ARCHIVE=0 skips it.
spark_jars="$(.venv/bin/python -c 'import os, pyspark; print(os.path.dirname(pyspark.__file__))')/jars"
cds_key="$( (java -version 2>&1; echo "$py_key $jvm_key $jvm_src_key $root"
             ls -l --time-style=+%s "$spark_jars" .cache/jars/spark/ .cache/oncolake-jvm/) | sha256sum | cut -c1-16)"
# Of no use to another clone, so kept in this one's .cache (about 200 MB).
archive=".cache/jvm-classes/$cds_key.jsa"
if [ "${ONCOLAKE_CLASS_ARCHIVE:-1}" = 1 ] && [ ! -f "$archive" ]; then
  step="dump the JVM class archive"
  log "dumping the JVM class archive into $archive (one small ingest, about a minute)"
  rm -rf .cache/jvm-classes .cache/jvm-classes.jsa
  work="$(mktemp -d)"
  mkdir -p "$work/in" .cache/jvm-classes
  .venv/bin/python -c 'import sys, cv2, numpy as np
cv2.imwrite(sys.argv[1], np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))' "$work/in/a.png"
  if scripts/submit.sh ingest --lake "$work/lake" --dataset warmup --input "$work/in" \
       --set "spark.conf.spark.driver.extraJavaOptions=-XX:ArchiveClassesAtExit=$work/classes.jsa" \
       >"$work/log" 2>&1 && [ -s "$work/classes.jsa" ]; then
    mv "$work/classes.jsa" "$archive.$$" && mv "$archive.$$" "$archive"
  else
    log "no class archive (jobs start slower; see the dump's log below)"; tail -5 "$work/log" >&2
  fi
  rm -rf "$work"
fi
if [ -f "$archive" ]; then ln -sfn "jvm-classes/$cds_key.jsa" .cache/jvm-classes.jsa; else rm -f .cache/jvm-classes.jsa; fi

# --- 4. system packages -------------------------------------------------------
# PostgreSQL's server (scripts/postgres.sh) from the OS packages; with
# ONCOLAKE_TEST_BROWSER=1 (scripts/test.sh sets it) also Debian's chromium and
# chromedriver, which the web page's test drives headless. ONCOLAKE_SYSTEM_PACKAGES=0
# skips this (container images, where PostgreSQL runs in a container of its own).
need=()
[ "${ONCOLAKE_SYSTEM_PACKAGES:-1}" = 0 ] || {
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || need+=(postgresql)
if [ "${ONCOLAKE_TEST_BROWSER:-0}" = 1 ]; then
  command -v chromium >/dev/null || need+=(chromium)
  command -v chromedriver >/dev/null || need+=(chromium-driver)
fi
}
if [ "${#need[@]}" -gt 0 ]; then
  step="install ${need[*]} (apt)"
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    log "need the OS packages ${need[*]}: install them (as root: apt-get install ${need[*]})"; exit 1
  fi
  log "installing ${need[*]} with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null; }
  # Debian's package starts a cluster of its own on 5432: scripts/postgres.sh runs its own
  if [[ " ${need[*]} " == *" postgresql "* ]] && command -v pg_lsclusters >/dev/null; then
    pg_lsclusters -h 2>/dev/null | while read -r ver name _; do pg_ctlcluster "$ver" "$name" stop 2>/dev/null || true; done
  fi
fi

log "ready: .venv ($py_key), jars at .cache/jars -> $jars"
