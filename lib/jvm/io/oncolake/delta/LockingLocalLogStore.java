package io.oncolake.delta;

import java.io.File;
import java.io.IOException;
import java.nio.channels.FileChannel;
import java.nio.channels.FileLock;
import java.nio.file.StandardOpenOption;
import java.util.Iterator;

import org.apache.hadoop.conf.Configuration;
import org.apache.hadoop.fs.Path;

import io.delta.storage.HDFSLogStore;

/**
 * Delta's log store for a lake on a local disk, safe with several Spark applications writing one
 * table at once.
 *
 * <p>Delta's commit protocol needs the storage to let only one writer create a commit file
 * ({@code _delta_log/N.json}). HDFS does (its rename without overwrite is atomic); a local file
 * system does not: Delta's default store checks that {@code N.json} is absent, then renames its
 * temporary file there, so two processes can both pass the check. The later rename then replaces
 * the earlier commit (that commit is lost), and Hadoop's checksum file, renamed separately, can end
 * up belonging to the other writer, so every later read of the table fails with a
 * {@code ChecksumException} (delta-io/delta#683, #1675).
 *
 * <p>This store makes the check and the rename one step: each write holds an exclusive lock on
 * {@value #LOCK_NAME} in the table's {@code _delta_log}, an OS record lock, so it is released when
 * the process dies however it dies. The loser of a race then finds {@code N.json} there, and
 * Delta's optimistic protocol retries its commit at {@code N+1}, as on HDFS. Threads of one JVM
 * take a monitor first (a process cannot lock a file twice).
 *
 * <p>Registered for the {@code file} scheme only ({@code spark.delta.logStore.file.impl}); tables
 * on HDFS keep Delta's own store. The lock serves writers on one host, or on a network file
 * system whose locks span hosts (NFS with its lock manager).
 */
public class LockingLocalLogStore extends HDFSLogStore {

    /** The lock file's name in {@code _delta_log}; Delta ignores names that are not its own. */
    public static final String LOCK_NAME = "_oncolake_commit.lock";

    private static final Object IN_THIS_JVM = new Object();

    public LockingLocalLogStore(Configuration conf) {
        super(conf);
    }

    @Override
    public void write(Path path, Iterator<String> actions, Boolean overwrite, Configuration conf)
            throws IOException {
        File log = new File(path.toUri().getPath()).getParentFile();
        log.mkdirs();
        File lockFile = new File(log, LOCK_NAME);
        synchronized (IN_THIS_JVM) {
            try (FileChannel channel = FileChannel.open(lockFile.toPath(),
                    StandardOpenOption.CREATE, StandardOpenOption.WRITE);
                 FileLock ignored = channel.lock()) {
                super.write(path, actions, overwrite, conf);
            }
        }
    }
}
