//! A btree of u64 keys, generic over the value type of its leaves (`Value`).  Leaves hold
//! entries `{key, value}` sorted by (key, value's sub key); a key may hold several values,
//! and all entries of one key live in the same leaf (splits happen at key boundaries), so a
//! key is looked up with a single descent.  Nodes are updated in place under the journal; empty
//! leaves are pruned, so every leaf stays at the same depth.  No recursion: paths are kept in
//! fixed arrays bounded by `MAX_DEPTH`.

use super::block::{
    Block, BlockType, Error, LeReader, LeWriter, Result, BLOCK_SIZE, HEADER_SIZE, H_AUX,
};
use super::cache::Cached;

/// Deepest btree accepted (root at level `depth - 1`, leaves at level 0).
pub const MAX_DEPTH: usize = 10;

/// Size of a leaf key (u64).
const KEY_SIZE: usize = 8;
/// Children per internal node.
pub const INTERNAL_CAP: usize = (BLOCK_SIZE - HEADER_SIZE) / InternalEntry::SIZE;

/// The type of the values a tree holds in its leaves, as the kernel's
/// `struct dm_btree_value_type`: its packed size and how it is packed, ordered and validated.
///
/// A leaf entry is a u64 key followed by the packed value.  A key may hold several values
/// (a multimap, up to what `validate_same_key` accepts): entries are sorted by
/// (key, `sub_key`), which must be unique, and all entries of one key stay in one leaf.  A
/// plain map returns 0 from `sub_key`.
///
/// `Default` is what an entry beyond the end of its block reads as (a bug: entries are
/// read below the count, which validation bounds by the capacity); nothing panics.
pub trait Value: Copy + Default {
    /// Packed size in bytes.
    const SIZE: usize;
    /// What `validate` needs to know (the range of valid pointers, ...).
    type Context: ?Sized;
    /// Writes the value as the next `SIZE` bytes of `w`.
    fn pack(&self, w: &mut LeWriter<'_>);
    /// Reads a value from the next `SIZE` bytes of `r`; `validate` judges it.
    fn unpack(r: &mut LeReader<'_>) -> Result<Self>;
    /// Order of the entries of one key.
    fn sub_key(&self) -> u64;
    /// Checks one value read from disk.
    fn validate(&self, ctx: &Self::Context) -> core::result::Result<(), &'static str>;
    /// Checks two neighbouring entries of one key; `run` counts the entries of that key up
    /// to `next` (2 or more).
    fn validate_same_key(
        prev: &Self,
        next: &Self,
        run: usize,
    ) -> core::result::Result<(), &'static str> {
        let _ = (prev, next, run);
        Ok(())
    }
    /// Checks a whole leaf of `n` entries (`entry(i)`: key and value of entry `i`), after
    /// every entry passed the checks above.
    fn validate_leaf(
        n: usize,
        entry: impl Fn(usize) -> (u64, Self),
    ) -> core::result::Result<(), &'static str> {
        let _ = (n, entry);
        Ok(())
    }
}

/// Bytes per leaf entry (key and value).
pub const fn leaf_entry_size<V: Value>() -> usize {
    KEY_SIZE + V::SIZE
}

/// Entries per leaf.
pub const fn leaf_cap<V: Value>() -> usize {
    (BLOCK_SIZE - HEADER_SIZE) / leaf_entry_size::<V>()
}

/// Root block and depth (number of levels; 1 = the root is a leaf).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Root {
    /// Block number of the root node.
    pub block: u64,
    /// Levels in the tree.
    pub depth: u32,
}

/// Access to btree nodes, implemented by the store (cache + allocator).
pub trait NodeStore {
    /// Loads (and on first read validates) node `block` expected at `level`; returns its slot.
    fn node(&mut self, block: u64, level: u16) -> Result<usize>;
    /// As `node`, without reading from disk: `Miss` if the node is not loaded.
    fn cached_node(&mut self, block: u64, level: u16) -> Result<Cached<usize>>;
    /// A loaded node.
    fn nb(&self, slot: usize) -> &Block;
    /// A loaded node, for modification.
    fn nb_mut(&mut self, slot: usize) -> &mut Block;
    /// Two loaded nodes, for modification.
    fn nb_mut2(&mut self, a: usize, b: usize) -> Result<(&mut Block, &mut Block)>;
    /// Allocates and initialises an empty node at `level`.
    fn alloc_node(&mut self, level: u16) -> Result<(u64, usize)>;
    /// Frees a node's block.
    fn free_node(&mut self, block: u64) -> Result<()>;
    /// Free metadata blocks left.
    fn meta_free(&self) -> u64;
}

/// The node fields of a block header (its type-specific word, at `H_AUX`): u16 entry
/// count, u16 level (0 = leaf), then 4 reserved bytes, which `pack` leaves as they are.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct NodeHeader {
    count: u16,
    level: u16,
}

impl NodeHeader {
    #[inline]
    fn pack(&self, b: &mut Block) {
        let mut w = LeWriter::new(&mut b[H_AUX..HEADER_SIZE]);
        w.u16(self.count);
        w.u16(self.level);
        debug_assert!(w.fits());
    }

    /// The header of `b` (its bounds are constant: it cannot fail).
    #[inline]
    fn unpack(b: &Block) -> NodeHeader {
        Self::read(&mut LeReader::new(&b[H_AUX..HEADER_SIZE])).unwrap_or_default()
    }

    #[inline]
    fn read(r: &mut LeReader<'_>) -> Result<NodeHeader> {
        Ok(NodeHeader {
            count: r.u16()?,
            level: r.u16()?,
        })
    }
}

/// Number of entries in a node.
#[inline]
pub fn count(b: &Block) -> usize {
    NodeHeader::unpack(b).count as usize
}

/// Sets the entry count of a node (bulk builders: `shsnap-bench populate`).
#[inline]
pub fn set_count(b: &mut Block, n: usize) {
    let h = NodeHeader {
        count: n as u16,
        ..NodeHeader::unpack(b)
    };
    h.pack(b);
}

/// Level of a node (0 = leaf).
#[inline]
pub fn level(b: &Block) -> u16 {
    NodeHeader::unpack(b).level
}

/// Initialises the node-specific header fields.
pub fn init_node(b: &mut Block, level: u16) {
    NodeHeader { count: 0, level }.pack(b);
}

/// Type of a node at `level`.
pub fn node_type(level: u16) -> BlockType {
    if level == 0 {
        BlockType::Leaf
    } else {
        BlockType::Internal
    }
}

/// A leaf entry: u64 key, then the value (`V::SIZE` bytes).  Entries follow the block
/// header, `leaf_entry_size::<V>()` bytes each.
#[derive(Debug, Clone, Copy, Default)]
struct LeafEntry<V: Value> {
    key: u64,
    value: V,
}

impl<V: Value> LeafEntry<V> {
    #[inline]
    fn pack(&self, out: &mut [u8]) {
        let mut w = LeWriter::new(out);
        w.u64(self.key);
        self.value.pack(&mut w);
        debug_assert!(w.fits() && w.pos() == leaf_entry_size::<V>());
    }

    #[inline]
    fn unpack(b: &[u8]) -> Result<Self> {
        let mut r = LeReader::new(b);
        Ok(LeafEntry {
            key: r.u64()?,
            value: V::unpack(&mut r)?,
        })
    }

    /// Only the key (the first field of `unpack`): what searches compare.
    #[inline]
    fn key(b: &[u8]) -> Result<u64> {
        LeReader::new(b).u64()
    }

    /// The bytes of leaf entry `i` of `b`.
    #[inline]
    fn at(b: &Block, i: usize) -> Result<&[u8]> {
        LeReader::new(&b[HEADER_SIZE..]).entry(i, leaf_entry_size::<V>())
    }

    /// Writes this as leaf entry `i` of `b`.
    #[inline]
    fn pack_at(&self, b: &mut Block, i: usize) {
        let mut table = LeWriter::new(&mut b[HEADER_SIZE..]);
        self.pack(table.entry(i, leaf_entry_size::<V>()));
        debug_assert!(table.fits());
    }
}

/// Byte offset of leaf entry `i`.
fn leaf_off<V: Value>(i: usize) -> usize {
    HEADER_SIZE + i * leaf_entry_size::<V>()
}

/// Key of leaf entry `i` (0 beyond the block: see `Value`).
#[inline]
pub fn leaf_key<V: Value>(b: &Block, i: usize) -> u64 {
    LeafEntry::<V>::at(b, i)
        .and_then(LeafEntry::<V>::key)
        .unwrap_or(0)
}

/// Key and value of leaf entry `i` (zero key and default value beyond the block).
#[inline]
fn leaf_unpack<V: Value>(b: &Block, i: usize) -> LeafEntry<V> {
    LeafEntry::<V>::at(b, i)
        .and_then(LeafEntry::unpack)
        .unwrap_or_default()
}

/// Value of leaf entry `i`.
#[inline]
pub fn leaf_value<V: Value>(b: &Block, i: usize) -> V {
    leaf_unpack::<V>(b, i).value
}

/// Key and value of leaf entry `i`.
#[inline]
pub fn leaf_entry<V: Value>(b: &Block, i: usize) -> (u64, V) {
    let e = leaf_unpack::<V>(b, i);
    (e.key, e.value)
}

/// Writes key and value of leaf entry `i` (the count is set apart: `set_count`).
#[inline]
pub fn set_leaf_entry<V: Value>(b: &mut Block, i: usize, key: u64, v: &V) {
    LeafEntry { key, value: *v }.pack_at(b, i);
}

/// Writes the value of leaf entry `i` (its key is written back as it is).
#[inline]
pub fn set_leaf_value<V: Value>(b: &mut Block, i: usize, v: &V) {
    set_leaf_entry(b, i, leaf_key::<V>(b, i), v);
}

/// An internal node entry: u64 key (the smallest key under the child; 0 in the first entry),
/// u64 child block.  Entries follow the block header, `SIZE` bytes each.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct InternalEntry {
    key: u64,
    child: u64,
}

impl InternalEntry {
    const SIZE: usize = 16;

    #[inline]
    fn pack(&self, out: &mut [u8]) {
        let mut w = LeWriter::new(out);
        w.u64(self.key);
        w.u64(self.child);
        debug_assert!(w.fits() && w.pos() == Self::SIZE);
    }

    #[inline]
    fn unpack(b: &[u8]) -> Result<Self> {
        let mut r = LeReader::new(b);
        Ok(InternalEntry {
            key: r.u64()?,
            child: r.u64()?,
        })
    }

    /// Only the key (the first field of `unpack`): what searches compare.
    #[inline]
    fn key(b: &[u8]) -> Result<u64> {
        LeReader::new(b).u64()
    }

    /// The bytes of internal entry `i` of `b`.
    #[inline]
    fn at(b: &Block, i: usize) -> Result<&[u8]> {
        LeReader::new(&b[HEADER_SIZE..]).entry(i, Self::SIZE)
    }
}

/// Key of internal entry `i` (0 beyond the block).
#[inline]
fn internal_key(b: &Block, i: usize) -> u64 {
    InternalEntry::at(b, i)
        .and_then(InternalEntry::key)
        .unwrap_or(0)
}

/// Key and child of internal entry `i` (zeros beyond the block).
#[inline]
pub fn internal_entry(b: &Block, i: usize) -> (u64, u64) {
    let e = InternalEntry::at(b, i)
        .and_then(InternalEntry::unpack)
        .unwrap_or_default();
    (e.key, e.child)
}

/// Writes key and child of internal entry `i` (the count is set apart: `set_count`).
#[inline]
pub fn set_internal_entry(b: &mut Block, i: usize, key: u64, child: u64) {
    let mut table = LeWriter::new(&mut b[HEADER_SIZE..]);
    InternalEntry { key, child }.pack(table.entry(i, InternalEntry::SIZE));
    debug_assert!(table.fits());
}

/// Structural validation of a node just read: level, count, ordering, child range, and the
/// value type's own checks (`ctx`: what they need).  `child_ok` says whether a child block
/// number is plausible.
pub fn validate_node<V: Value>(
    b: &Block,
    blk: u64,
    want_level: u16,
    child_ok: impl Fn(u64) -> bool,
    ctx: &V::Context,
) -> Result<()> {
    let corrupt = |what| Err(Error::Corrupt { block: blk, what });
    if level(b) != want_level {
        return corrupt("btree node at unexpected level");
    }
    let n = count(b);
    if want_level == 0 {
        if n > leaf_cap::<V>() {
            return corrupt("leaf entry count too large");
        }
        let mut run = 0usize;
        let mut prev: Option<(u64, V)> = None;
        for i in 0..n {
            let (k, v) = leaf_entry::<V>(b, i);
            if let Err(what) = v.validate(ctx) {
                return corrupt(what);
            }
            if let Some((pk, pv)) = prev {
                if (pk, pv.sub_key()) >= (k, v.sub_key()) {
                    return corrupt("leaf entries out of order");
                }
                if pk == k {
                    run += 1;
                    if let Err(what) = V::validate_same_key(&pv, &v, run) {
                        return corrupt(what);
                    }
                } else {
                    run = 1;
                }
            } else {
                run = 1;
            }
            prev = Some((k, v));
        }
        if let Err(what) = V::validate_leaf(n, |i| leaf_entry::<V>(b, i)) {
            return corrupt(what);
        }
    } else {
        if n == 0 || n > INTERNAL_CAP {
            return corrupt("internal node entry count out of range");
        }
        for i in 0..n {
            let (k, c) = internal_entry(b, i);
            if !child_ok(c) {
                return corrupt("child pointer outside the metadata area");
            }
            if i > 0 && internal_key(b, i - 1) >= k {
                return corrupt("internal keys out of order");
            }
        }
    }
    Ok(())
}

/// Index of the child of internal node `b` that covers `key`.
fn child_index(b: &Block, key: u64) -> usize {
    let n = count(b);
    let (mut lo, mut hi) = (0usize, n);
    // largest i with key_i <= key; 0 if none
    while lo + 1 < hi {
        let mid = (lo + hi) / 2;
        if internal_key(b, mid) <= key {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lo
}

/// First leaf index whose (key, sub key) is >= (key, sub).
fn leaf_lower_bound<V: Value>(b: &Block, key: u64, sub: u64) -> usize {
    let (mut lo, mut hi) = (0usize, count(b));
    while lo < hi {
        let mid = (lo + hi) / 2;
        let (k, v) = leaf_entry::<V>(b, mid);
        if (k, v.sub_key()) < (key, sub) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    lo
}

/// Range of leaf indices holding the entries of `key`.
pub fn key_range<V: Value>(b: &Block, key: u64) -> (usize, usize) {
    let s = leaf_lower_bound::<V>(b, key, 0);
    let mut e = s;
    let n = count(b);
    while e < n && leaf_key::<V>(b, e) == key {
        e += 1;
    }
    (s, e)
}

/// A descent from the root to a leaf.
#[derive(Clone, Copy)]
pub struct Path {
    /// (block, slot, child index) of each internal node, root first.
    nodes: [(u64, usize, usize); MAX_DEPTH],
    len: usize,
    /// Block and slot of the leaf.
    pub leaf: (u64, usize),
    /// Smallest key not covered by this leaf (None: the last leaf).
    pub upper: Option<u64>,
}

/// Descends to the leaf covering `key`.
pub fn find_leaf<V: Value>(ns: &mut impl NodeStore, root: Root, key: u64) -> Result<Path> {
    match descend::<V>(ns, root, key, false)? {
        Cached::Hit(path) => Ok(path),
        Cached::Miss => Err(Error::Bug("a blocking btree descent missed the cache")),
    }
}

/// As `find_leaf`, without reading from disk: `Miss` if a node on the way is not loaded.
pub fn find_cached_leaf<V: Value>(
    ns: &mut impl NodeStore,
    root: Root,
    key: u64,
) -> Result<Cached<Path>> {
    descend::<V>(ns, root, key, true)
}

/// `find_leaf`; `cached_only`: load nodes with `cached_node`.
fn descend<V: Value>(
    ns: &mut impl NodeStore,
    root: Root,
    key: u64,
    cached_only: bool,
) -> Result<Cached<Path>> {
    if root.depth == 0 || root.depth as usize > MAX_DEPTH {
        return Err(Error::Corrupt {
            block: root.block,
            what: "btree depth out of range",
        });
    }
    let mut path = Path {
        nodes: [(0, 0, 0); MAX_DEPTH],
        len: 0,
        leaf: (0, 0),
        upper: None,
    };
    let mut blk = root.block;
    let mut lvl = (root.depth - 1) as u16;
    // Key range [lo, upper) the node must stay within (its parent's entry says so): a node
    // with keys outside it was forged or misplaced, and a lookup there would miss entries.
    let mut lo = 0u64;
    loop {
        let slot = if cached_only {
            match ns.cached_node(blk, lvl)? {
                Cached::Hit(slot) => slot,
                Cached::Miss => return Ok(Cached::Miss),
            }
        } else {
            ns.node(blk, lvl)?
        };
        let b = ns.nb(slot);
        let n = count(b);
        let in_range = |k: u64| k >= lo && path.upper.is_none_or(|h| k < h);
        let (first, last) = match (lvl, n) {
            (_, 0) => (lo, lo),
            (0, _) => (leaf_key::<V>(b, 0), leaf_key::<V>(b, n - 1)),
            (_, 1) => (lo, lo),
            _ => (internal_key(b, 1), internal_key(b, n - 1)),
        };
        if !in_range(first) || !in_range(last) || (lvl > 0 && n > 1 && first == lo) {
            return Err(Error::Corrupt {
                block: blk,
                what: "btree node keys outside its parent's range",
            });
        }
        if lvl == 0 {
            path.leaf = (blk, slot);
            return Ok(Cached::Hit(path));
        }
        let i = child_index(b, key);
        if i + 1 < n {
            path.upper = Some(internal_key(b, i + 1));
        }
        if i > 0 {
            lo = internal_key(b, i);
        }
        let child = internal_entry(b, i).1;
        path.nodes[path.len] = (blk, slot, i);
        path.len += 1;
        blk = child;
        lvl -= 1;
    }
}

/// Inserts an entry (the caller guarantees (key, sub key) is not present).
pub fn insert<V: Value>(ns: &mut impl NodeStore, root: &mut Root, key: u64, v: V) -> Result<()> {
    if ns.meta_free() < root.depth as u64 + 2 {
        return Err(Error::NoSpace);
    }
    let mut path = find_leaf::<V>(ns, *root, key)?;
    let (_, lslot) = path.leaf;
    let n = count(ns.nb(lslot));
    if n < leaf_cap::<V>() {
        leaf_insert_at(ns.nb_mut(lslot), key, v);
        return Ok(());
    }
    // Split the leaf at a key boundary near the middle.
    let b = ns.nb(lslot);
    let mid = n / 2;
    let mut split = None;
    for d in 0..n {
        for cand in [mid.wrapping_sub(d), mid + d] {
            if cand >= 1 && cand < n && leaf_key::<V>(b, cand - 1) != leaf_key::<V>(b, cand) {
                split = Some(cand);
                break;
            }
        }
        if split.is_some() {
            break;
        }
    }
    let Some(split) = split else {
        return Err(Error::Corrupt {
            block: path.leaf.0,
            what: "leaf holds one key only",
        });
    };
    let (rblk, rslot) = ns.alloc_node(0)?;
    let (l, r) = ns.nb_mut2(lslot, rslot)?;
    let es = leaf_entry_size::<V>();
    r[HEADER_SIZE..HEADER_SIZE + (n - split) * es]
        .copy_from_slice(&l[HEADER_SIZE + split * es..HEADER_SIZE + n * es]);
    set_count(r, n - split);
    set_count(l, split);
    let sep = leaf_key::<V>(r, 0);
    if key >= sep {
        leaf_insert_at(r, key, v);
    } else {
        leaf_insert_at(l, key, v);
    }
    insert_parent(ns, root, &mut path, sep, rblk)
}

fn leaf_insert_at<V: Value>(b: &mut Block, key: u64, v: V) {
    let n = count(b);
    let es = leaf_entry_size::<V>();
    let pos = leaf_lower_bound::<V>(b, key, v.sub_key());
    let o = leaf_off::<V>(pos);
    b.copy_within(o..HEADER_SIZE + n * es, o + es);
    set_leaf_entry(b, pos, key, &v);
    set_count(b, n + 1);
}

/// Adds (key, child) to the parent of the node just split, splitting upwards as needed.
fn insert_parent(
    ns: &mut impl NodeStore,
    root: &mut Root,
    path: &mut Path,
    mut key: u64,
    mut child: u64,
) -> Result<()> {
    let mut lvl = 1u16;
    while path.len > 0 {
        path.len -= 1;
        let (pblk, pslot, idx) = path.nodes[path.len];
        let n = count(ns.nb(pslot));
        if n < INTERNAL_CAP {
            internal_insert_at(ns.nb_mut(pslot), idx + 1, key, child);
            return Ok(());
        }
        let (rblk, rslot) = ns.alloc_node(lvl)?;
        let split = n / 2;
        let (l, r) = ns.nb_mut2(pslot, rslot)?;
        for i in split..n {
            let (k, c) = internal_entry(l, i);
            set_internal_entry(r, i - split, k, c);
        }
        set_count(r, n - split);
        set_count(l, split);
        let sep = internal_key(r, 0);
        if idx + 1 >= split {
            internal_insert_at(r, idx + 1 - split, key, child);
        } else {
            internal_insert_at(l, idx + 1, key, child);
        }
        let _ = pblk;
        key = sep;
        child = rblk;
        lvl += 1;
    }
    // The root split: grow the tree by one level.
    if root.depth as usize >= MAX_DEPTH {
        return Err(Error::NoSpace);
    }
    let (nblk, nslot) = ns.alloc_node(root.depth as u16)?;
    let b = ns.nb_mut(nslot);
    set_internal_entry(b, 0, 0, root.block);
    set_internal_entry(b, 1, key, child);
    set_count(b, 2);
    root.block = nblk;
    root.depth += 1;
    Ok(())
}

fn internal_insert_at(b: &mut Block, pos: usize, key: u64, child: u64) {
    let n = count(b);
    let o = HEADER_SIZE + pos * InternalEntry::SIZE;
    b.copy_within(
        o..HEADER_SIZE + n * InternalEntry::SIZE,
        o + InternalEntry::SIZE,
    );
    set_internal_entry(b, pos, key, child);
    set_count(b, n + 1);
}

/// Removes leaf entry `idx` of the leaf on `path`; prunes the leaf if it becomes empty.
pub fn remove_at<V: Value>(
    ns: &mut impl NodeStore,
    root: &mut Root,
    path: &Path,
    idx: usize,
) -> Result<()> {
    let (_, lslot) = path.leaf;
    let b = ns.nb_mut(lslot);
    let n = count(b);
    if idx >= n {
        return Err(Error::Bug("leaf index out of range"));
    }
    let es = leaf_entry_size::<V>();
    let o = leaf_off::<V>(idx);
    b.copy_within(o + es..HEADER_SIZE + n * es, o);
    set_count(b, n - 1);
    if n - 1 == 0 {
        prune(ns, root, path)?;
    }
    Ok(())
}

/// Removes entry `i` of a leaf block (the caller prunes the leaf if it becomes empty).
pub fn leaf_remove<V: Value>(b: &mut Block, i: usize) {
    let n = count(b);
    if i >= n {
        return;
    }
    let es = leaf_entry_size::<V>();
    let o = leaf_off::<V>(i);
    b.copy_within(o + es..HEADER_SIZE + n * es, o);
    set_count(b, n - 1);
}

/// Unlinks the empty leaf on `path` (and any internal node left empty) from the tree.
pub fn prune(ns: &mut impl NodeStore, root: &mut Root, path: &Path) -> Result<()> {
    let mut victim = path.leaf.0;
    let mut depth = path.len;
    while depth > 0 {
        depth -= 1;
        let (_, pslot, idx) = path.nodes[depth];
        ns.free_node(victim)?;
        let b = ns.nb_mut(pslot);
        let n = count(b);
        let o = HEADER_SIZE + idx * InternalEntry::SIZE;
        b.copy_within(
            o + InternalEntry::SIZE..HEADER_SIZE + n * InternalEntry::SIZE,
            o,
        );
        set_count(b, n - 1);
        if n - 1 > 0 {
            break;
        }
        victim = path.nodes[depth].0;
        if depth == 0 {
            // The root lost its last child: the tree becomes one empty leaf.
            ns.free_node(victim)?;
            let (nblk, _) = ns.alloc_node(0)?;
            root.block = nblk;
            root.depth = 1;
            return Ok(());
        }
    }
    // Shrink a root with one child.
    while root.depth > 1 {
        let slot = ns.node(root.block, (root.depth - 1) as u16)?;
        let b = ns.nb(slot);
        if count(b) != 1 {
            break;
        }
        let child = internal_entry(b, 0).1;
        ns.free_node(root.block)?;
        root.block = child;
        root.depth -= 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::block::init_header;
    use super::*;
    use std::vec::Vec;

    /// A toy value: a u32 that orders the entries of one key; 0 is invalid, and a key may
    /// hold at most 4 values.
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
    struct Toy(u32);

    impl Value for Toy {
        const SIZE: usize = 4;
        type Context = ();
        fn pack(&self, w: &mut LeWriter<'_>) {
            w.u32(self.0);
        }
        fn unpack(r: &mut LeReader<'_>) -> Result<Self> {
            r.u32().map(Toy)
        }
        fn sub_key(&self) -> u64 {
            self.0 as u64
        }
        fn validate(&self, _: &()) -> core::result::Result<(), &'static str> {
            if self.0 == 0 {
                return Err("zero value");
            }
            Ok(())
        }
        fn validate_same_key(
            _: &Self,
            _: &Self,
            run: usize,
        ) -> core::result::Result<(), &'static str> {
            if run > 4 {
                return Err("too many values for one key");
            }
            Ok(())
        }
    }

    /// Nodes in a Vec: block number = index; freed blocks are remembered, not reused.
    struct Mem {
        nodes: Vec<Block>,
        free: Vec<bool>,
        limit: usize,
    }

    impl Mem {
        fn new() -> (Mem, Root) {
            let mut m = Mem {
                nodes: Vec::new(),
                free: Vec::new(),
                limit: 100_000,
            };
            let (blk, _) = m.alloc_node(0).unwrap();
            (
                m,
                Root {
                    block: blk,
                    depth: 1,
                },
            )
        }

        fn in_use(&self) -> usize {
            self.free.iter().filter(|f| !**f).count()
        }
    }

    impl NodeStore for Mem {
        fn cached_node(&mut self, block: u64, level: u16) -> Result<Cached<usize>> {
            self.node(block, level).map(Cached::Hit)
        }
        fn node(&mut self, block: u64, level: u16) -> Result<usize> {
            let b = &self.nodes[block as usize];
            assert!(!self.free[block as usize], "freed node {} reached", block);
            validate_node::<Toy>(b, block, level, |c| (c as usize) < self.nodes.len(), &())?;
            Ok(block as usize)
        }
        fn nb(&self, slot: usize) -> &Block {
            &self.nodes[slot]
        }
        fn nb_mut(&mut self, slot: usize) -> &mut Block {
            &mut self.nodes[slot]
        }
        fn nb_mut2(&mut self, a: usize, b: usize) -> Result<(&mut Block, &mut Block)> {
            assert!(a < b, "the new node comes after");
            let (x, y) = self.nodes.split_at_mut(b);
            Ok((&mut x[a], &mut y[0]))
        }
        fn alloc_node(&mut self, level: u16) -> Result<(u64, usize)> {
            let blk = self.nodes.len();
            let mut b = [0u8; BLOCK_SIZE];
            init_header(&mut b, node_type(level), blk as u64, 1);
            init_node(&mut b, level);
            self.nodes.push(b);
            self.free.push(false);
            Ok((blk as u64, blk))
        }
        fn free_node(&mut self, block: u64) -> Result<()> {
            assert!(!self.free[block as usize], "double free of node {}", block);
            self.free[block as usize] = true;
            Ok(())
        }
        fn meta_free(&self) -> u64 {
            (self.limit - self.in_use()) as u64
        }
    }

    /// The values of `key`, in order.
    fn lookup(m: &mut Mem, root: Root, key: u64) -> Vec<u32> {
        let p = find_leaf::<Toy>(m, root, key).unwrap();
        let b = m.nb(p.leaf.1);
        let (s, e) = key_range::<Toy>(b, key);
        (s..e).map(|i| leaf_value::<Toy>(b, i).0).collect()
    }

    /// Keys 0..n in a scrambled order, value key + 1.
    fn fill(m: &mut Mem, root: &mut Root, n: u64) {
        for i in 0..n {
            let k = (i * 7919) % n;
            insert(m, root, k * 10, Toy(k as u32 + 1)).unwrap();
        }
    }

    #[test]
    fn insert_and_lookup_many_keys() {
        let (mut m, mut root) = Mem::new();
        let n = 100_000u64;
        fill(&mut m, &mut root, n);
        // 100000 entries of 12 bytes: more leaves than one internal node holds.
        assert_eq!(leaf_cap::<Toy>(), 338);
        assert_eq!(root.depth, 3, "leaves and internal nodes were split");
        for k in 0..n {
            assert_eq!(
                lookup(&mut m, root, k * 10),
                [k as u32 + 1],
                "key {}",
                k * 10
            );
            assert_eq!(lookup(&mut m, root, k * 10 + 5), Vec::<u32>::new());
        }
        // A walk of the leaves in key order sees every key once, in order.
        let (mut key, mut seen) = (0u64, 0u64);
        loop {
            let p = find_leaf::<Toy>(&mut m, root, key).unwrap();
            let b = m.nb(p.leaf.1);
            for i in 0..count(b) {
                assert_eq!(leaf_key::<Toy>(b, i), seen * 10);
                seen += 1;
            }
            match p.upper {
                Some(u) => key = u,
                None => break,
            }
        }
        assert_eq!(seen, n);
    }

    #[test]
    fn several_values_per_key_stay_sorted() {
        let (mut m, mut root) = Mem::new();
        fill(&mut m, &mut root, 2000);
        for v in [900_000, 5, 70] {
            insert(&mut m, &mut root, 420, Toy(v)).unwrap();
        }
        // Key 420 had value 43; the others sort in by value.
        assert_eq!(lookup(&mut m, root, 420), [5, 43, 70, 900_000]);
        // One more than validate_same_key allows makes the leaf unreadable.
        let p = find_leaf::<Toy>(&mut m, root, 420).unwrap();
        insert(&mut m, &mut root, 420, Toy(6)).unwrap();
        let r = m.node(p.leaf.0, 0);
        assert!(
            matches!(
                r,
                Err(Error::Corrupt {
                    what: "too many values for one key",
                    ..
                })
            ),
            "{:?}",
            r
        );
    }

    #[test]
    fn remove_everything_collapses_the_tree() {
        let (mut m, mut root) = Mem::new();
        let n = 5000u64;
        fill(&mut m, &mut root, n);
        assert!(root.depth >= 2);
        for i in 0..n {
            let k = ((i * 31) % n) * 10;
            let p = find_leaf::<Toy>(&mut m, root, k).unwrap();
            let (s, e) = key_range::<Toy>(m.nb(p.leaf.1), k);
            assert_eq!(e - s, 1, "key {} present once", k);
            remove_at::<Toy>(&mut m, &mut root, &p, s).unwrap();
            assert_eq!(lookup(&mut m, root, k), Vec::<u32>::new());
        }
        assert_eq!(root.depth, 1);
        assert_eq!(count(m.nb(root.block as usize)), 0);
        assert_eq!(m.in_use(), 1, "only the empty root leaf is left");
    }

    /// The node layout of Documentation/format.md, byte by byte (independent of the
    /// pack/unpack code it checks).
    #[test]
    fn node_layout_is_the_documented_one() {
        let mut b = [0u8; BLOCK_SIZE];
        init_node(&mut b, 3);
        set_count(&mut b, 0x1234);
        assert_eq!(b[24..32], [0x34, 0x12, 3, 0, 0, 0, 0, 0]);
        assert_eq!((count(&b), level(&b)), (0x1234, 3));
        set_internal_entry(&mut b, 2, 0x0102_0304_0506_0708, 0x1112_1314_1516_1718);
        assert_eq!(b[64..72], 0x0102_0304_0506_0708u64.to_le_bytes());
        assert_eq!(b[72..80], 0x1112_1314_1516_1718u64.to_le_bytes());
        assert_eq!(
            internal_entry(&b, 2),
            (0x0102_0304_0506_0708, 0x1112_1314_1516_1718)
        );
        let mut b = [0u8; BLOCK_SIZE];
        set_leaf_entry(&mut b, 2, 0xa1a2_a3a4_a5a6_a7a8, &Toy(0xb1b2_b3b4));
        let o = HEADER_SIZE + 2 * 12;
        assert_eq!(b[o..o + 8], 0xa1a2_a3a4_a5a6_a7a8u64.to_le_bytes());
        assert_eq!(b[o + 8..o + 12], 0xb1b2_b3b4u32.to_le_bytes());
        assert_eq!(
            leaf_entry::<Toy>(&b, 2),
            (0xa1a2_a3a4_a5a6_a7a8, Toy(0xb1b2_b3b4))
        );
        set_leaf_value(&mut b, 2, &Toy(9));
        assert_eq!(leaf_entry::<Toy>(&b, 2), (0xa1a2_a3a4_a5a6_a7a8, Toy(9)));
        // Beyond the block: zeros, no panic.
        assert_eq!(leaf_entry::<Toy>(&b, leaf_cap::<Toy>() + 1), (0, Toy(0)));
        assert_eq!(internal_entry(&b, INTERNAL_CAP), (0, 0));
    }

    #[test]
    fn validation_rejects_bad_leaves() {
        let (mut m, mut root) = Mem::new();
        fill(&mut m, &mut root, 100);
        let blk = root.block as usize;
        assert_eq!(root.depth, 1);
        let good = m.nodes[blk];
        let check = |b: &Block| validate_node::<Toy>(b, blk as u64, 0, |_| true, &());
        assert_eq!(check(&good), Ok(()));
        let mut b = good;
        set_leaf_entry(&mut b, 3, 5, &Toy(6)); // key 5 after key 20
        assert!(matches!(
            check(&b),
            Err(Error::Corrupt {
                what: "leaf entries out of order",
                ..
            })
        ));
        let mut b = good;
        set_leaf_value(&mut b, 7, &Toy(0));
        assert!(matches!(
            check(&b),
            Err(Error::Corrupt {
                what: "zero value",
                ..
            })
        ));
        let mut b = good;
        set_count(&mut b, leaf_cap::<Toy>() + 1);
        assert!(matches!(check(&b), Err(Error::Corrupt { .. })));
        assert!(matches!(
            validate_node::<Toy>(&good, blk as u64, 1, |_| true, &()),
            Err(Error::Corrupt { .. })
        ));
    }
}
