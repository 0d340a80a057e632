// SPDX-License-Identifier: GPL-2.0
/*
 * oe-router lab, TEST ONLY: a deliberately faulty "rfc4106(gcm(aes))" driver.
 *
 * Wraps the kernel's own synchronous rfc4106(gcm(aes)). Parameter `fault`: 0 correct,
 * 1 flip a ciphertext bit after the tag was computed, 2 fail every encryption with -EIO
 * (the packet is dropped). It registers at priority 1 with fault 0, so it passes the
 * kernel's self-test and is nobody's pick until crypto_user raises it.
 */
#include <linux/module.h>
#include <crypto/internal/aead.h>
#include <crypto/scatterwalk.h>

static int fault;
module_param(fault, int, 0644);
MODULE_PARM_DESC(fault, "0 correct, 1 flip a ciphertext bit, 2 fail encryption with -EIO");

static atomic_t faulted = ATOMIC_INIT(0);
static int faulted_get(char *buf, const struct kernel_param *kp)
{
	return sysfs_emit(buf, "%d\n", atomic_read(&faulted));
}
static const struct kernel_param_ops faulted_ops = { .get = faulted_get };
module_param_cb(faulted, &faulted_ops, NULL, 0444);
MODULE_PARM_DESC(faulted, "encryptions broken so far");

struct faulty_ctx {
	struct crypto_aead *fb;
};

static int faulty_setkey(struct crypto_aead *tfm, const u8 *key, unsigned int len)
{
	struct faulty_ctx *ctx = crypto_aead_ctx(tfm);

	return crypto_aead_setkey(ctx->fb, key, len);
}

static int faulty_setauthsize(struct crypto_aead *tfm, unsigned int authsize)
{
	struct faulty_ctx *ctx = crypto_aead_ctx(tfm);

	return crypto_aead_setauthsize(ctx->fb, authsize);
}

static int faulty_crypt(struct aead_request *req, bool enc)
{
	struct crypto_aead *tfm = crypto_aead_reqtfm(req);
	struct faulty_ctx *ctx = crypto_aead_ctx(tfm);
	struct aead_request *sub = aead_request_ctx(req);
	int mode = READ_ONCE(fault);
	int err;
	u8 b;

	if (enc && mode == 2) {
		atomic_inc(&faulted);
		return -EIO;
	}
	aead_request_set_tfm(sub, ctx->fb);
	aead_request_set_callback(sub, req->base.flags & CRYPTO_TFM_REQ_MAY_SLEEP, NULL, NULL);
	aead_request_set_crypt(sub, req->src, req->dst, req->cryptlen, req->iv);
	aead_request_set_ad(sub, req->assoclen);
	err = enc ? crypto_aead_encrypt(sub) : crypto_aead_decrypt(sub);
	if (!err && enc && mode == 1 && req->cryptlen) {
		scatterwalk_map_and_copy(&b, req->dst, req->assoclen, 1, 0);
		b ^= 0x80;
		scatterwalk_map_and_copy(&b, req->dst, req->assoclen, 1, 1);
		atomic_inc(&faulted);
	}
	return err;
}

static int faulty_encrypt(struct aead_request *req) { return faulty_crypt(req, true); }
static int faulty_decrypt(struct aead_request *req) { return faulty_crypt(req, false); }

static int faulty_init(struct crypto_aead *tfm)
{
	struct faulty_ctx *ctx = crypto_aead_ctx(tfm);
	struct crypto_aead *fb;

	/* synchronous, and never this driver: it needs a fallback, the fallback must not */
	fb = crypto_alloc_aead("rfc4106(gcm(aes))", 0, CRYPTO_ALG_ASYNC | CRYPTO_ALG_NEED_FALLBACK);
	if (IS_ERR(fb))
		return PTR_ERR(fb);
	ctx->fb = fb;
	crypto_aead_set_reqsize(tfm, sizeof(struct aead_request) + crypto_aead_reqsize(fb));
	return 0;
}

static void faulty_exit(struct crypto_aead *tfm)
{
	struct faulty_ctx *ctx = crypto_aead_ctx(tfm);

	crypto_free_aead(ctx->fb);
}

static struct aead_alg faulty_alg = {
	.setkey = faulty_setkey,
	.setauthsize = faulty_setauthsize,
	.encrypt = faulty_encrypt,
	.decrypt = faulty_decrypt,
	.init = faulty_init,
	.exit = faulty_exit,
	.ivsize = 8,
	.maxauthsize = 16,
	.base = {
		.cra_name = "rfc4106(gcm(aes))",
		.cra_driver_name = "rfc4106-gcm-aes-faulty",
		.cra_priority = 1,
		.cra_flags = CRYPTO_ALG_NEED_FALLBACK,
		.cra_blocksize = 1,
		.cra_ctxsize = sizeof(struct faulty_ctx),
		.cra_module = THIS_MODULE,
	},
};

static int __init faulty_mod_init(void)
{
	return crypto_register_aead(&faulty_alg);
}

static void __exit faulty_mod_exit(void)
{
	crypto_unregister_aead(&faulty_alg);
}

module_init(faulty_mod_init);
module_exit(faulty_mod_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("oe-router lab (test only): a deliberately faulty rfc4106(gcm(aes)) driver");
