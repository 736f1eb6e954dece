-- Data keys and their rotation policy (issue 16): backup.encryption_keys
-- (filled from walshipper info --json's `keys`), the policy the scheduler
-- carries out (walshipper key rotate / key retire), its audit and alerts.
-- Key material and passphrases never enter the database.
SELECT 1;
