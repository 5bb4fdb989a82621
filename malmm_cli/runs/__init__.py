"""Many inputs behind one interface: one by one, --batch lockstep, or --ray workers."""
