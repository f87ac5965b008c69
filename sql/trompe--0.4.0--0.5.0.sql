-- Upgrade of trompe from 0.4.0 to 0.5.0 (ALTER EXTENSION trompe UPDATE).
\echo Use "ALTER EXTENSION trompe UPDATE TO '0.5.0'" to load this file. \quit
