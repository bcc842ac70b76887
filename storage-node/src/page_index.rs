//! A dense index from the pages of one PG to their entries.
//!
//! The append path indexes every durable record by its page, and pages are
//! random: in a hash map each insert costs two cache misses (control bytes,
//! then the slot) in a table far larger than the cache, and the table must
//! rehash as it grows, holding the segment for tens of milliseconds. A PG's
//! pages are a dense range, so a plain array of 4-byte slots, one per page
//! (a few MiB, zero-filled lazily by the OS), finds a page's entry with one
//! access; the entries themselves are appended to a vector in the order
//! pages are first touched.

use common::ids::PageId;
use common::limits::PAGES_PER_PG_MAX;

/// Page -> `T` for the pages `first_page .. first_page + page_count`.
#[derive(Debug)]
pub struct PageIndex<T> {
    first_page: u64,
    /// Per page: 0 if it has no entry, else 1 + its position in `entries`.
    slots: Vec<u32>,
    entries: Vec<(PageId, T)>,
}

impl<T: Default> PageIndex<T> {
    /// An empty index for `page_count` pages starting at `first_page`.
    ///
    /// # Panics
    /// If `page_count` exceeds [`PAGES_PER_PG_MAX`] (validated earlier, in
    /// the segment configuration).
    pub fn new(first_page: u64, page_count: u64) -> Self {
        assert!(page_count <= PAGES_PER_PG_MAX, "a PG of {page_count} pages exceeds PAGES_PER_PG_MAX");
        PageIndex { first_page, slots: vec![0; page_count as usize], entries: Vec::new() }
    }

    fn slot(&self, page: PageId) -> Option<usize> {
        let offset = page.0.checked_sub(self.first_page)?;
        (offset < self.slots.len() as u64).then_some(offset as usize)
    }

    fn position(&self, page: PageId) -> Option<usize> {
        let slot = self.slot(page)?;
        self.slots[slot].checked_sub(1).map(|position| position as usize)
    }

    pub fn get(&self, page: PageId) -> Option<&T> {
        self.position(page).map(|position| &self.entries[position].1)
    }

    pub fn get_mut(&mut self, page: PageId) -> Option<&mut T> {
        self.position(page).map(|position| &mut self.entries[position].1)
    }

    /// The entry of `page`, created empty if it has none.
    ///
    /// # Panics
    /// If `page` is outside the index's range (callers validate pages first).
    pub fn get_or_default(&mut self, page: PageId) -> &mut T {
        let slot = self.slot(page).unwrap_or_else(|| panic!("{page} is outside this PG's page index"));
        if self.slots[slot] == 0 {
            self.entries.push((page, T::default()));
            self.slots[slot] = self.entries.len() as u32;
        }
        let position = self.slots[slot] as usize - 1;
        &mut self.entries[position].1
    }

    /// Pages with an entry, in the order they got one.
    pub fn pages(&self) -> impl Iterator<Item = PageId> + '_ {
        self.entries.iter().map(|(page, _)| *page)
    }

    /// The entry at `position` in that order (positions never change).
    pub fn at(&self, position: usize) -> Option<(PageId, &T)> {
        self.entries.get(position).map(|(page, entry)| (*page, entry))
    }

    pub fn values(&self) -> impl Iterator<Item = &T> {
        self.entries.iter().map(|(_, entry)| entry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_only_pages_of_its_range_and_creates_entries_once() {
        let mut index: PageIndex<Vec<u8>> = PageIndex::new(100, 10);
        assert_eq!(index.get(PageId(100)), None);
        assert_eq!(index.get(PageId(99)), None, "below the range");
        assert_eq!(index.get(PageId(110)), None, "past the range");
        index.get_or_default(PageId(107)).push(1);
        index.get_or_default(PageId(100)).push(2);
        index.get_or_default(PageId(107)).push(3);
        assert_eq!(index.get(PageId(107)), Some(&vec![1, 3]));
        index.get_mut(PageId(100)).expect("created").push(4);
        assert_eq!(index.get(PageId(100)), Some(&vec![2, 4]));
        assert_eq!(index.pages().collect::<Vec<_>>(), vec![PageId(107), PageId(100)]);
        assert_eq!(index.values().map(Vec::len).sum::<usize>(), 4);
    }

    #[test]
    #[should_panic(expected = "outside this PG's page index")]
    fn creating_an_entry_outside_the_range_is_a_bug() {
        let mut index: PageIndex<u8> = PageIndex::new(0, 4);
        index.get_or_default(PageId(4));
    }
}
