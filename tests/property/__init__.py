"""Property-based tests (hypothesis): bad and edge inputs for every public function."""
