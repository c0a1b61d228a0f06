/// The SQLite schema of one member's MVCC store.
///
/// - `revs` holds every revision of every key until compaction. Its rowid is
///   `mod_rev << 24 | sub` (`RevisionID`), so rowid order is event order and the events of a
///   revision range are a rowid range: no second index on revisions.
/// - `latest` maps each live key to the rowid of its current revision (reads at the current
///   revision never scan history).
/// - `leases` holds each lease's granted TTL; its attached keys are the current rows carrying its
///   id (`revs_by_lease`).
/// - `store_state` is a single row: the current and compacted revisions and the index of the last
///   applied log entry, written in the same SQLite transaction as the changes it describes.
enum Schema {
    static let version: Int64 = 1

    static let statements = [
        """
        CREATE TABLE IF NOT EXISTS revs(
          id INTEGER PRIMARY KEY,
          key BLOB NOT NULL,
          mod_rev INTEGER NOT NULL,
          sub INTEGER NOT NULL,
          create_rev INTEGER NOT NULL,
          version INTEGER NOT NULL,
          lease INTEGER NOT NULL,
          value BLOB NOT NULL,
          tombstone INTEGER NOT NULL)
        """,
        "CREATE UNIQUE INDEX IF NOT EXISTS revs_by_key ON revs(key, mod_rev)",
        "CREATE TABLE IF NOT EXISTS latest(key BLOB PRIMARY KEY, id INTEGER NOT NULL) WITHOUT ROWID",
        """
        CREATE TABLE IF NOT EXISTS store_state(
          id INTEGER PRIMARY KEY CHECK (id = 1),
          current_rev INTEGER NOT NULL,
          compact_rev INTEGER NOT NULL,
          applied_index INTEGER NOT NULL,
          schema_version INTEGER NOT NULL)
        """,
        "INSERT OR IGNORE INTO store_state VALUES (1, 1, 0, 0, \(version))",
        "CREATE TABLE IF NOT EXISTS alarms(member_id INTEGER NOT NULL, alarm INTEGER NOT NULL, PRIMARY KEY(member_id, alarm)) WITHOUT ROWID",
        // Leases and their granted TTLs; the keys attached to a lease are the live rows with its id,
        // found through a partial index that costs nothing for puts without a lease.
        "CREATE TABLE IF NOT EXISTS leases(id INTEGER PRIMARY KEY, ttl INTEGER NOT NULL)",
        "CREATE INDEX IF NOT EXISTS revs_by_lease ON revs(lease) WHERE lease != 0",
        "CREATE TABLE IF NOT EXISTS member_meta(name TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID",
        // The cluster's members (an encoded Member each) and the IDs removed from it (`Membership`).
        "CREATE TABLE IF NOT EXISTS members(id INTEGER PRIMARY KEY, member BLOB NOT NULL)",
        "CREATE TABLE IF NOT EXISTS members_removed(id INTEGER PRIMARY KEY)",
        // The auth store (`AuthTables`): encoded authpb Users and Roles by name, the flag and the
        // auth revision.
        "CREATE TABLE IF NOT EXISTS auth_users(name BLOB PRIMARY KEY, user BLOB NOT NULL) WITHOUT ROWID",
        "CREATE TABLE IF NOT EXISTS auth_roles(name BLOB PRIMARY KEY, role BLOB NOT NULL) WITHOUT ROWID",
        "CREATE TABLE IF NOT EXISTS auth_meta(id INTEGER PRIMARY KEY CHECK (id = 1), enabled INTEGER NOT NULL, revision INTEGER NOT NULL)",
    ]
}
