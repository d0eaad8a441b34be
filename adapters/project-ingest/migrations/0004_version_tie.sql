-- What orders events of one ordering key among themselves (pluto-core never moves a
-- project's `updated`: all its updates of a project share one time): when each arrived or
-- was published. A column of its own, not appended to `version`, so a release before it
-- still compares `version` alone and applies an equal one over a row this one wrote.
ALTER TABLE projects ADD COLUMN version_tie TEXT;
ALTER TABLE commissions ADD COLUMN version_tie TEXT;
