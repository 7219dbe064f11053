/* ember_mapguard.h: survive SIGBUS from a truncated, mapped model file (see mapguard.c). */
#ifndef EMBER_MAPGUARD_H
#define EMBER_MAPGUARD_H

#include <stddef.h>
#include <stdint.h>

#define EMBER_MAPGUARD_SLOTS 1024 /* maps guarded at once (a test process keeps many models open) */

/* Guard [p, p + n): a SIGBUS there maps a zero page and counts a fault.
 * Installs the SIGBUS handler on first use. Returns the slot, or -1 (table full,
 * n == 0, or sigaction failed). */
int ember_mapguard_add(const void *p, size_t n);
/* Stop guarding a slot (before its region is unmapped). */
void ember_mapguard_remove(int slot);
/* Pages repaired in a slot since it was added: > 0 means the file shrank under the map. */
uint64_t ember_mapguard_faults(int slot);

#endif
