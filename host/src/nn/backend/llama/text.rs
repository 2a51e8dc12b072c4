//! The text of one generation as tokens turn into it: bytes of a character split across
//! tokens wait for the rest, stop strings end the text where they start (also across tokens),
//! and what is handed to the reader never includes what could still turn out to be the start
//! of a stop string.

/// Text generated so far, and how much of it was handed out.
#[derive(Debug, Default)]
pub(super) struct GeneratedText {
    /// Bytes of a character split across tokens.
    partial_utf8: Vec<u8>,
    text: String,
    emitted: usize,
}

impl GeneratedText {
    /// Adds a token's bytes. Returns whether a stop string now ends the text (it is cut where
    /// the earliest one starts). Only the new end of the text is searched, so the cost of a
    /// token does not grow with the generation.
    pub(super) fn push_piece(&mut self, piece: &[u8], stops: &[String]) -> bool {
        let before = self.text.len();
        self.partial_utf8.extend_from_slice(piece);
        self.take_complete_utf8();
        let longest = stops.iter().map(String::len).max().unwrap_or(0);
        let mut from = before.saturating_sub(longest.saturating_sub(1));
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        let stop = stops
            .iter()
            .filter_map(|s| self.text[from..].find(s.as_str()))
            .min();
        match stop {
            Some(at) => {
                self.text.truncate(from + at);
                self.emitted = self.emitted.min(self.text.len());
                true
            }
            None => false,
        }
    }

    /// The text not yet handed out. Until the generation is `finished`, the end that could
    /// still become a stop string is held back.
    pub(super) fn take(&mut self, finished: bool, stops: &[String]) -> String {
        let mut end = self.text.len();
        if !finished {
            let hold = stops
                .iter()
                .map(|s| s.len().saturating_sub(1))
                .max()
                .unwrap_or(0);
            end = end.saturating_sub(hold).max(self.emitted);
            while !self.text.is_char_boundary(end) {
                end -= 1;
            }
        }
        let text = self.text[self.emitted..end].to_string();
        self.emitted = end;
        text
    }

    /// Moves the complete characters of `partial_utf8` into `text`.
    fn take_complete_utf8(&mut self) {
        let valid = match std::str::from_utf8(&self.partial_utf8) {
            Ok(text) => text.len(),
            Err(error) if error.error_len().is_none() => error.valid_up_to(),
            // Invalid bytes (not merely incomplete) are replaced rather than kept forever.
            Err(_) => {
                let lossy = String::from_utf8_lossy(&self.partial_utf8).into_owned();
                self.text.push_str(&lossy);
                self.partial_utf8.clear();
                return;
            }
        };
        let complete: Vec<u8> = self.partial_utf8.drain(..valid).collect();
        self.text
            .push_str(std::str::from_utf8(&complete).expect("checked above"));
    }
}

#[cfg(test)]
mod tests {
    use super::GeneratedText;
    use proptest::prelude::*;

    fn stops(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_character_split_across_tokens_waits_for_its_last_byte() {
        let mut text = GeneratedText::default();
        let e_acute = "é".as_bytes();
        assert!(!text.push_piece(b"caf", &[]));
        assert!(!text.push_piece(&e_acute[..1], &[]));
        assert_eq!(text.take(false, &[]), "caf");
        assert!(!text.push_piece(&e_acute[1..], &[]));
        assert_eq!(text.take(false, &[]), "é");
        assert!(!text.push_piece(b"\xff!", &[]));
        assert_eq!(text.take(true, &[]), "\u{fffd}!");
    }

    #[test]
    fn a_stop_string_across_tokens_ends_the_text_where_it_starts() {
        let stop = stops(&["\nUser:"]);
        let mut text = GeneratedText::default();
        assert!(!text.push_piece(b"Hello\nUs", &stop));
        // "\nUs" could be the start of the stop string: held back.
        assert_eq!(text.take(false, &stop), "Hel");
        assert!(text.push_piece(b"er: more", &stop));
        assert_eq!(text.take(true, &stop), "lo");
    }

    #[test]
    fn what_was_held_back_is_handed_out_when_it_is_not_a_stop() {
        let stop = stops(&["STOP"]);
        let mut text = GeneratedText::default();
        assert!(!text.push_piece(b"ab ST", &stop));
        assert_eq!(text.take(false, &stop), "ab");
        assert!(!text.push_piece(b"ay here", &stop));
        assert_eq!(text.take(false, &stop), " STay h");
        assert_eq!(text.take(true, &stop), "ere");
    }

    #[test]
    fn a_four_byte_character_over_three_tokens_is_handed_out_whole() {
        let crab = "🦀".as_bytes();
        let mut text = GeneratedText::default();
        assert!(!text.push_piece(&crab[..1], &[]));
        assert_eq!(text.take(false, &[]), "");
        assert!(!text.push_piece(&crab[1..3], &[]));
        assert_eq!(text.take(false, &[]), "");
        assert!(!text.push_piece(&crab[3..], &[]));
        assert_eq!(text.take(false, &[]), "🦀");
    }

    #[test]
    fn holding_back_for_a_stop_string_never_cuts_a_character() {
        let stop = stops(&["abc"]);
        let mut text = GeneratedText::default();
        // Two bytes are held back, which would end inside the three bytes of "€".
        assert!(!text.push_piece("x€".as_bytes(), &stop));
        assert_eq!(text.take(false, &stop), "x");
        assert_eq!(text.take(true, &stop), "€");
    }

    #[test]
    fn the_search_for_a_stop_string_starts_on_a_character_boundary() {
        let stop = stops(&["ab"]);
        let mut text = GeneratedText::default();
        // The search goes back one byte before the new token, into the middle of "€".
        assert!(!text.push_piece("€".as_bytes(), &stop));
        assert!(!text.push_piece(b"a", &stop));
        assert!(text.push_piece(b"b", &stop));
        assert_eq!(text.take(true, &stop), "€");
    }

    #[test]
    fn a_stop_string_is_found_when_its_characters_are_split_across_tokens() {
        let stop = stops(&["€!"]);
        let euro = "€".as_bytes();
        let mut text = GeneratedText::default();
        assert!(!text.push_piece(&[b"hello", &euro[..2]].concat(), &stop));
        assert_eq!(text.take(false, &stop), "he");
        assert!(text.push_piece(&[&euro[2..], b"! b"].concat(), &stop));
        assert_eq!(text.take(true, &stop), "llo");
    }

    #[test]
    fn a_stop_string_at_the_start_leaves_no_text() {
        let stop = stops(&["###"]);
        let mut whole = GeneratedText::default();
        assert!(whole.push_piece(b"### Answer", &stop));
        assert_eq!(whole.take(true, &stop), "");

        let mut split = GeneratedText::default();
        assert!(!split.push_piece(b"#", &stop));
        assert_eq!(split.take(false, &stop), "");
        assert!(split.push_piece(b"## Answer", &stop));
        assert_eq!(split.take(true, &stop), "");
    }

    #[test]
    fn the_earliest_of_several_stop_strings_ends_the_text() {
        // Listed first but found later in the text.
        let stop = stops(&["\n\n", "User:"]);
        let mut text = GeneratedText::default();
        assert!(!text.push_piece(b"Sure.\nUs", &stop));
        // The longest stop string decides how much is held back.
        assert_eq!(text.take(false, &stop), "Sure");
        assert!(text.push_piece(b"er: hi\n\n", &stop));
        assert_eq!(text.take(true, &stop), ".\n");

        // Both end in the same token: the one that starts first wins, though it is longer.
        let stop = stops(&["c", "abc"]);
        let mut text = GeneratedText::default();
        assert!(!text.push_piece(b"xab", &stop));
        assert!(text.push_piece(b"c d", &stop));
        assert_eq!(text.take(true, &stop), "x");
    }

    proptest! {
        /// However the bytes of a text are split into tokens and whenever the reader takes
        /// chunks, the chunks add up to the text, cut at the first stop string.
        #[test]
        fn chunks_add_up_to_the_text_up_to_the_first_stop(
            words in prop::collection::vec("[a-zé€ ]{0,6}", 0..12),
            cuts in prop::collection::vec(0usize..8, 0..40),
            stop in "[a-z€]{1,3}",
        ) {
            let whole: String = words.concat();
            let bytes = whole.as_bytes();
            let expected = match whole.find(&stop) {
                Some(at) => &whole[..at],
                None => whole.as_str(),
            };
            let stops = vec![stop];
            let mut text = GeneratedText::default();
            let (mut taken, mut at, mut stopped) = (String::new(), 0, false);
            for cut in cuts {
                let end = (at + cut).min(bytes.len());
                stopped = text.push_piece(&bytes[at..end], &stops);
                at = end;
                taken.push_str(&text.take(stopped, &stops));
                if stopped {
                    break;
                }
            }
            if !stopped {
                stopped = text.push_piece(&bytes[at..], &stops);
            }
            taken.push_str(&text.take(true, &stops));
            prop_assert_eq!(taken.as_str(), expected);
            prop_assert_eq!(stopped, expected.len() < whole.len());
        }

        /// With several stop strings, the text ends as if all of it were searched for every
        /// stop string after each token: the search of only its new end misses none.
        #[test]
        fn several_stops_end_the_text_as_a_search_of_all_of_it_would(
            // Few letters, so that several stop strings often turn up in one token.
            words in prop::collection::vec("[abé€ ]{0,6}", 0..12),
            cuts in prop::collection::vec(0usize..8, 0..40),
            stops in prop::collection::vec("[ab€ ]{1,3}", 1..4),
        ) {
            let whole: String = words.concat();
            let mut ends: Vec<usize> = cuts
                .iter()
                .scan(0, |at, cut| {
                    *at = (*at + cut).min(whole.len());
                    Some(*at)
                })
                .collect();
            ends.push(whole.len());
            let mut text = GeneratedText::default();
            let (mut taken, mut at, mut expected) = (String::new(), 0, whole.as_str());
            for end in ends {
                let stopped = text.push_piece(&whole.as_bytes()[at..end], &stops);
                at = end;
                let mut complete = end;
                while !whole.is_char_boundary(complete) {
                    complete -= 1;
                }
                let so_far = &whole[..complete];
                let earliest = stops.iter().filter_map(|s| so_far.find(s.as_str())).min();
                prop_assert_eq!(stopped, earliest.is_some());
                taken.push_str(&text.take(stopped, &stops));
                if let Some(start) = earliest {
                    expected = &whole[..start];
                    break;
                }
            }
            taken.push_str(&text.take(true, &stops));
            prop_assert_eq!(taken.as_str(), expected);
        }
    }
}
