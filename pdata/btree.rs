//! A btree of u64 keys, generic over the value type of its leaves (`Value`).  Leaves hold
//! entries `{key, value}` sorted by (key, value's sub key); a key may hold several values,
//! and all entries of one key live in the same leaf (splits happen at key boundaries), so a
//! key is looked up with a single descent.  Nodes are updated in place under the journal; empty
//! leaves are pruned, so every leaf stays at the same depth.  No recursion: paths are kept in
//! fixed arrays bounded by `MAX_DEPTH`.

use super::block::{
    get16, get64, put16, put64, Block, BlockType, Error, Result, BLOCK_SIZE, HEADER_SIZE,
};
use super::cache::Cached;

/// Deepest btree accepted (root at level `depth - 1`, leaves at level 0).
pub const MAX_DEPTH: usize = 10;

/// Offset of the entry count (u16) in a node header.
const N_COUNT: usize = 24;
/// Offset of the node level (u16, 0 = leaf) in a node header.
const N_LEVEL: usize = 26;

/// Size of a leaf key (u64).
const KEY_SIZE: usize = 8;
const INTERNAL_ENTRY: usize = 16;
/// Children per internal node.
pub const INTERNAL_CAP: usize = (BLOCK_SIZE - HEADER_SIZE) / INTERNAL_ENTRY;

/// The type of the values a tree holds in its leaves, as the kernel's
/// `struct dm_btree_value_type`: its packed size and how it is packed, ordered and validated.
///
/// A leaf entry is a u64 key followed by the packed value.  A key may hold several values
/// (a multimap, up to what `validate_same_key` accepts): entries are sorted by
/// (key, `sub_key`), which must be unique, and all entries of one key stay in one leaf.  A
/// plain map returns 0 from `sub_key`.
pub trait Value: Copy {
    /// Packed size in bytes.
    const SIZE: usize;
    /// What `validate` needs to know (the range of valid pointers, ...).
    type Context: ?Sized;
    /// Writes the value into `out` (`SIZE` bytes).
    fn pack(&self, out: &mut [u8]);
    /// Reads a value from `b` (`SIZE` bytes); `validate` judges it.
    fn unpack(b: &[u8]) -> Self;
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

/// Number of entries in a node.
pub fn count(b: &Block) -> usize {
    get16(b, N_COUNT) as usize
}

/// Sets the entry count of a node (bulk builders: `shsnap-bench populate`).
pub fn set_count(b: &mut Block, n: usize) {
    put16(b, N_COUNT, n as u16);
}

/// Level of a node (0 = leaf).
pub fn level(b: &Block) -> u16 {
    get16(b, N_LEVEL)
}

/// Initialises the node-specific header fields.
pub fn init_node(b: &mut Block, level: u16) {
    set_count(b, 0);
    put16(b, N_LEVEL, level);
}

/// Type of a node at `level`.
pub fn node_type(level: u16) -> BlockType {
    if level == 0 {
        BlockType::Leaf
    } else {
        BlockType::Internal
    }
}

/// Byte offset of leaf entry `i`.
fn leaf_off<V: Value>(i: usize) -> usize {
    HEADER_SIZE + i * leaf_entry_size::<V>()
}

/// Key of leaf entry `i`.
pub fn leaf_key<V: Value>(b: &Block, i: usize) -> u64 {
    get64(b, leaf_off::<V>(i))
}

/// Value of leaf entry `i`.
pub fn leaf_value<V: Value>(b: &Block, i: usize) -> V {
    let o = leaf_off::<V>(i) + KEY_SIZE;
    V::unpack(&b[o..o + V::SIZE])
}

/// Key and value of leaf entry `i`.
pub fn leaf_entry<V: Value>(b: &Block, i: usize) -> (u64, V) {
    (leaf_key::<V>(b, i), leaf_value::<V>(b, i))
}

/// Writes key and value of leaf entry `i` (the count is set apart: `set_count`).
pub fn set_leaf_entry<V: Value>(b: &mut Block, i: usize, key: u64, v: &V) {
    let o = leaf_off::<V>(i);
    put64(b, o, key);
    set_leaf_value(b, i, v);
}

/// Writes the value of leaf entry `i`.
pub fn set_leaf_value<V: Value>(b: &mut Block, i: usize, v: &V) {
    let o = leaf_off::<V>(i) + KEY_SIZE;
    v.pack(&mut b[o..o + V::SIZE]);
}

/// Key and child of internal entry `i`.
pub fn internal_entry(b: &Block, i: usize) -> (u64, u64) {
    let o = HEADER_SIZE + i * INTERNAL_ENTRY;
    (get64(b, o), get64(b, o + 8))
}

/// Writes key and child of internal entry `i` (the count is set apart: `set_count`).
pub fn set_internal_entry(b: &mut Block, i: usize, key: u64, child: u64) {
    let o = HEADER_SIZE + i * INTERNAL_ENTRY;
    put64(b, o, key);
    put64(b, o + 8, child);
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
            if i > 0 && internal_entry(b, i - 1).0 >= k {
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
        if internal_entry(b, mid).0 <= key {
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
            _ => (internal_entry(b, 1).0, internal_entry(b, n - 1).0),
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
            path.upper = Some(internal_entry(b, i + 1).0);
        }
        if i > 0 {
            lo = internal_entry(b, i).0;
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
        let sep = internal_entry(r, 0).0;
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
    let o = HEADER_SIZE + pos * INTERNAL_ENTRY;
    b.copy_within(o..HEADER_SIZE + n * INTERNAL_ENTRY, o + INTERNAL_ENTRY);
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
        let o = HEADER_SIZE + idx * INTERNAL_ENTRY;
        b.copy_within(o + INTERNAL_ENTRY..HEADER_SIZE + n * INTERNAL_ENTRY, o);
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
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    struct Toy(u32);

    impl Value for Toy {
        const SIZE: usize = 4;
        type Context = ();
        fn pack(&self, out: &mut [u8]) {
            out.copy_from_slice(&self.0.to_le_bytes());
        }
        fn unpack(b: &[u8]) -> Self {
            Toy(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
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
