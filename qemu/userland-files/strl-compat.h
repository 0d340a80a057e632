/*
 * strlcpy/strlcat for C libraries without them (glibc before 2.38); musl, which OpenWrt
 * uses, has both. Force-included with -include by qemu/userland.py, and only when the
 * host's libc lacks them.
 *
 * It includes no libc header on purpose: pulling one in here would fix the feature-test
 * macros before the source's own `#define _GNU_SOURCE` is seen.
 */
#ifndef OE_STRL_COMPAT_H
#define OE_STRL_COMPAT_H

static inline __SIZE_TYPE__ strlcpy(char *dst, const char *src, __SIZE_TYPE__ size)
{
	__SIZE_TYPE__ len = __builtin_strlen(src);

	if (size > 0) {
		__SIZE_TYPE__ n = len < size - 1 ? len : size - 1;

		__builtin_memcpy(dst, src, n);
		dst[n] = '\0';
	}
	return len;
}

static inline __SIZE_TYPE__ strlcat(char *dst, const char *src, __SIZE_TYPE__ size)
{
	__SIZE_TYPE__ used = 0;

	while (used < size && dst[used] != '\0')
		used++;
	if (used == size)
		return size + __builtin_strlen(src);
	return used + strlcpy(dst + used, src, size - used);
}

#endif
