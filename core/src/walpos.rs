//! Positions in PostgreSQL's write-ahead log.

/// Bytes of the header at the start of every WAL page (`SizeOfXLogShortPHD`).
const SHORT_PAGE_HEADER: u64 = 24;
/// Bytes of the header of the first page of a WAL segment (`SizeOfXLogLongPHD`).
const LONG_PAGE_HEADER: u64 = 40;

/// The end of the WAL inserted so far, given the insert position (`GetXLogInsertRecPtr`), WAL
/// page size and segment size: what `XLogFlush` may be asked for. Right after a page's header
/// nothing has been written on that page yet, and the WAL ends at the page's start (PostgreSQL
/// refuses a flush request past it); anywhere else the two are the same.
pub fn end_of_inserted(insert: u64, page_size: u64, segment_size: u64) -> u64 {
    if page_size == 0 || segment_size == 0 {
        return insert;
    }
    let first_of_segment = insert % segment_size < page_size;
    let header = if first_of_segment { LONG_PAGE_HEADER } else { SHORT_PAGE_HEADER };
    if insert % page_size == header {
        insert - header
    } else {
        insert
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: u64 = 8192;
    const SEGMENT: u64 = 16 * 1024 * 1024;

    #[test]
    fn right_after_a_page_header_the_wal_ends_at_the_page_start() {
        // The case a flush request failed on: 0/1918018 while the WAL ended at 0/1918000.
        assert_eq!(end_of_inserted(0x1918018, PAGE, SEGMENT), 0x1918000);
        // The first page of a segment has the long header.
        assert_eq!(end_of_inserted(2 * SEGMENT + 40, PAGE, SEGMENT), 2 * SEGMENT);
    }

    #[test]
    fn anywhere_else_the_insert_position_is_the_end() {
        assert_eq!(end_of_inserted(0x1918020, PAGE, SEGMENT), 0x1918020);
        // 24 bytes into a segment's first page is inside its long header's record data.
        assert_eq!(end_of_inserted(2 * SEGMENT + 24, PAGE, SEGMENT), 2 * SEGMENT + 24);
        // 40 bytes into another page: a record's continuation may end there.
        assert_eq!(end_of_inserted(0x1918028, PAGE, SEGMENT), 0x1918028);
        assert_eq!(end_of_inserted(0x1918000, PAGE, SEGMENT), 0x1918000);
        assert_eq!(end_of_inserted(5, 0, 0), 5);
    }
}
